"""Helpers shared by the data-set registrations: paths, clear missing-file errors, lazy registration.

Every registration is lazy: ``DatasetCatalog.register(name, loader)`` stores a function, and the
files are read only when ``DatasetCatalog.get(name)`` is called. Each call builds fresh dicts, so
no caller can corrupt the dicts another caller sees (the official code mutated them in place).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from psalm.structures.masks import valid_polygons

logger = logging.getLogger(__name__)

README_HINT = "datasets/README.md"

# every name registered through `register_lazy`, so that a re-registration (another root) is possible
_PSALM_NAMES: set[str] = set()


def datasets_root(root: str | None = None) -> str:
    """The data-set root: ``root`` if given, else ``$DETECTRON2_DATASETS``, else ``./datasets``."""
    return root if root is not None else os.environ.get("DETECTRON2_DATASETS", "datasets")


class MissingDatasetFileError(FileNotFoundError):
    """A file or folder a registered data set needs does not exist (message says how to make it)."""


def require_path(path: str, dataset_name: str, prepare: str, is_dir: bool = False) -> str:
    """Return ``path`` if it exists, else raise :class:`MissingDatasetFileError` naming the fix.

    Args:
        path: the file (or folder with ``is_dir``) the data set reads.
        dataset_name: registered name, for the message.
        prepare: the step that creates or downloads the file, e.g. ``"python datasets/prepare_refcoco.py"``.
    """
    ok = os.path.isdir(path) if is_dir else os.path.isfile(path)
    if not ok:
        kind = "folder" if is_dir else "file"
        raise MissingDatasetFileError(
            f"Data set '{dataset_name}' needs the {kind} {path!r}, which does not exist. "
            f"Create it with: {prepare}  (layout and sources: {README_HINT}; "
            f"the root is $DETECTRON2_DATASETS, now {datasets_root()!r})."
        )
    return path


def load_json(path: str, dataset_name: str, prepare: str):
    """``json.load`` of a required file (clear error when missing or not JSON)."""
    require_path(path, dataset_name, prepare)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"Data set '{dataset_name}': {path!r} is not valid JSON ({e}). Re-create it with: {prepare}"
            ) from e


def register_lazy(name: str, loader: Callable[[], list], **metadata) -> None:
    """Register ``loader`` under ``name`` with ``metadata``; replaces an earlier psalm registration.

    A name already registered by someone else (e.g. detectron2's builtin sets) is an error.
    """
    if name in DatasetCatalog.list():
        if name not in _PSALM_NAMES:
            raise ValueError(f"data set name {name!r} is already registered by another library; pick another name")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    _PSALM_NAMES.add(name)


def registered_psalm_names() -> list[str]:
    """Every data-set name registered by psalm, sorted."""
    return sorted(_PSALM_NAMES)


def contiguous_map(ids: Iterable[int]) -> dict[int, int]:
    """Dataset category ids -> 0..K-1 in the given order."""
    return {int(i): k for k, i in enumerate(ids)}


def category_id_maps(categories: Iterable[dict]) -> tuple[dict[int, int], dict[int, int]]:
    """detectron2 id maps of a thing + stuff label space, the Mask2Former way.

    Args:
        categories: K dicts with ``id`` (data-set id) and ``isthing``, in contiguous-id order.
    Returns:
        ``(thing_dataset_id_to_contiguous_id, stuff_dataset_id_to_contiguous_id)``: the thing map
        holds the thing classes only (their ids into the K-class space); the stuff map holds EVERY
        class, things included, because detectron2's ``SemSegEvaluator`` reads its contiguous-id ->
        data-set-id table from it and must know every predicted label. Code that needs to know
        whether an id is a thing must test the thing map first (the stuff map is not stuff-only).
    """
    cats = list(categories)
    things = {int(c["id"]): k for k, c in enumerate(cats) if c["isthing"]}
    every = {int(c["id"]): k for k, c in enumerate(cats)}
    if len(every) != len(cats):
        raise ValueError(f"category ids are not unique: {[c['id'] for c in cats]}")
    return things, every


def log_loaded(name: str, n: int, what: str = "samples") -> None:
    logger.info("Loaded %d %s for data set '%s'", n, what, name)


def log_invalid_segmentations(name: str, n: int) -> None:
    """The count of annotations dropped for want of a valid segmentation (detectron2's warning)."""
    if n:
        logger.warning(
            "Data set '%s': filtered out %d annotation(s) without a valid segmentation (every polygon has "
            "fewer than 3 points or an odd number of coordinates), as detectron2's COCO loader does",
            name, n,
        )


def coco_annotation_to_d2(ann: dict, category_id: int, **extra) -> dict | None:
    """One COCO annotation (``segmentation`` polygons / RLE, XYWH ``bbox``) as a detectron2 dataset-dict
    annotation with the contiguous ``category_id``; ``extra`` fields are added as given. The input
    is not modified (``area`` is kept when present).

    Degenerate polygons (fewer than 3 points, odd length) are dropped, as detectron2's
    ``load_coco_json`` does; None when no valid polygon is left (the caller drops the annotation
    and reports the count with :func:`log_invalid_segmentations`)."""
    segm = ann["segmentation"]
    if isinstance(segm, list):
        segm = [list(p) for p in valid_polygons(segm)]
        if not segm:
            return None
    obj = {
        "id": ann.get("id"),
        "segmentation": segm,
        "bbox": ann["bbox"],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category_id,
        "iscrowd": int(ann.get("iscrowd", 0)),
    }
    if "area" in ann:
        obj["area"] = ann["area"]
    obj.update(extra)
    return obj
