"""Open-vocabulary class names per benchmark, exactly as the official model was prompted with.

The lists are package data in ``psalm/data/class_names/<benchmark>.json``. Each file records its
``source``, the ``prompt_rule`` (how the official code turned it into the prompt) and how far it is
``verified``; each category has ``id`` (the dataset's id), ``name`` (the string that goes into one
``<cls>`` span), ``isthing`` and ``color``, and where relevant ``raw_name`` / ``synonyms``.

* ``coco_panoptic``: the 133 raw COCO panoptic names (``wall-other-merged``, ``tree-merged``...).
* ``coco_instance``: its 80 thing classes (derived, not a file).
* ``ade20k_150``, ``pascal_ctx_59``, ``pascal_voc_20``: the comma-separated synonym list verbatim
  (OpenSeg / FC-CLIP prompt-engineered names); VOC-20 without ``background``.
* ``pascal_ctx_459``: the first synonym only (the official code does this for > 200 classes).
* ``cityscapes``: raw names (19 train classes); ``cityscapes_instance``: its 8 thing classes.
"""
from __future__ import annotations

import functools
import json
import os

__all__ = ["BENCHMARKS", "load_categories", "load_class_names", "class_names_info"]

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "class_names")

# benchmark -> (file, filter on categories)
_DERIVED = {
    "coco_instance": ("coco_panoptic", lambda c: c["isthing"] == 1),
    "ade20k_150_instance": ("ade20k_150", lambda c: c["isthing"] == 1),
    "cityscapes_instance": ("cityscapes", lambda c: c["isthing"] == 1),
}
_FILES = ("coco_panoptic", "ade20k_150", "pascal_ctx_59", "pascal_ctx_459", "pascal_voc_20", "cityscapes")
BENCHMARKS = tuple(sorted(_FILES + tuple(_DERIVED)))


@functools.lru_cache(maxsize=None)
def _read(file_key: str) -> dict:
    path = os.path.join(_DIR, f"{file_key}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-name file {path!r} is missing from the psalm package; reinstall psalm")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _resolve(benchmark: str) -> tuple[dict, list[dict]]:
    if benchmark in _DERIVED:
        file_key, keep = _DERIVED[benchmark]
        doc = _read(file_key)
        return doc, [c for c in doc["categories"] if keep(c)]
    if benchmark in _FILES:
        doc = _read(benchmark)
        return doc, list(doc["categories"])
    raise KeyError(f"unknown class-name benchmark {benchmark!r}; choose one of {BENCHMARKS}")


def load_categories(benchmark: str) -> list[dict]:
    """Category dicts (``id``, ``name``, ``isthing``, ``color``, ...) in contiguous-id order (copies)."""
    return [dict(c) for c in _resolve(benchmark)[1]]


def load_class_names(benchmark: str) -> list[str]:
    """The K prompt strings (one per ``<cls>`` span) in contiguous-id order; no ``background``."""
    return [c["name"] for c in _resolve(benchmark)[1]]


def class_names_info(benchmark: str) -> dict:
    """``source``, ``prompt_rule`` and ``verified`` notes of a benchmark's list."""
    doc = _resolve(benchmark)[0]
    return {k: v for k, v in doc.items() if k != "categories"}
