"""Data set registration (detectron2 ``DatasetCatalog``) and the PixelLM training loader.

| name | content |
|---|---|
| ``pixellm_muse_{train,val,test_less,test_many}`` | MUSE, released JSON files under ``$PIXELLM_MUSE_DIR`` (default ``datasets/muse``): ``muse_<split>.json`` (or ``MUSE_<split>.json``) + COCO images under ``images/`` (``file_name``) or ``images/{train,val}2017`` (``coco_url``); read by psalm's loader (:mod:`psalm.data.datasets.muse`; psalm registers the released files in its own layout, ``$DETECTRON2_DATASETS/muse`` with the images from ``coco/``, as ``muse_<split>``) |
| ``pixellm_synthetic_muse_{train,val,test}`` | multi-target questions on psalm's synthetic scenes in the MUSE format, generated on first use under ``$PIXELLM_SYNTHETIC_DIR`` (default ``datasets/pixellm_synthetic_muse``) |

``val`` is the dev split (choices are made there); ``test`` is for reported figures only.

Training members (:func:`training_items`, one kind per ``DATASETS.TRAIN`` entry): MUSE-format
multi-target dicts (``multi_reason_seg``), psalm's referring data sets (``refer_seg``, converted per
image by :func:`~pixellm.data.muse.multi_target_from_referring`), psalm's semantic data sets
(``sem_seg``: ``task == "semantic"`` dicts with ``sem_seg_file_name`` and metadata ``stuff_classes`` /
``ignore_label``, e.g. ``ade20k_sem_seg_train_psalm``, ``coco_2017_train_semantic_psalm``,
``psalm_synthetic_train_semantic``; converted by :func:`~pixellm.data.muse.multi_target_from_semantic`)
and LLaVA conversations (``vqa``).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog

from psalm.data.datasets.muse import MUSE_SPLITS, MUSE_TASK, load_muse_json, muse_json_path

from .muse import prepare_synthetic_muse

__all__ = ["register_pixellm_datasets", "register_synthetic_muse", "PixelLMTrainLoader", "save_tiny_pixellm_tokenizer",
           "training_items"]


def _muse_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PIXELLM_MUSE_DIR", "datasets/muse"))


def _load_muse(split):
    root = _muse_root()
    return load_muse_json(muse_json_path(root, split), root / "images", f"pixellm_muse_{split}",
                          prepare="python projects/PixelLM/prepare_muse.py --src <jsons> --images <coco> --out "
                                  f"{root} (or set PIXELLM_MUSE_DIR)")


def register_synthetic_muse(prefix: str = "pixellm_synthetic_muse", root=None, spec=None,
                            answer_style: str = "is") -> list[str]:
    """Register ``<prefix>_{train,val,test}``; the files are generated on first load."""
    root = pathlib.Path(root or os.environ.get("PIXELLM_SYNTHETIC_DIR", "datasets/pixellm_synthetic_muse"))
    names = []
    for split in ("train", "val", "test"):
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)

        def load(split=split, name=name):
            return load_muse_json(prepare_synthetic_muse(root, split, spec, answer_style=answer_style), root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(task=MUSE_TASK, evaluator_type="muse", split=split)
        names.append(name)
    return names


def register_pixellm_datasets() -> None:
    for split in MUSE_SPLITS:
        name = f"pixellm_muse_{split}"
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda split=split: _load_muse(split))
            MetadataCatalog.get(name).set(task=MUSE_TASK, evaluator_type="muse", split=split)
    if "pixellm_synthetic_muse_train" not in DatasetCatalog.list():
        register_synthetic_muse()


def save_tiny_pixellm_tokenizer(directory, num_codebook_tokens: int = 6) -> str:
    """psalm's tiny byte-level BPE tokenizer (synthetic corpus) + the PixelLM tokens, for tests and
    synthetic training (the release uses LLaMA's sentencepiece tokenizer)."""
    from transformers import AutoTokenizer

    from psalm.data.synthetic import save_synthetic_tokenizer

    from ..modeling.codebook import codebook_tokens
    from ..modeling.tokenizer import add_pixellm_tokens

    directory = pathlib.Path(directory)
    if not (directory / "tokenizer_config.json").is_file() or "[SEG0]" not in (directory / "tokenizer.json").read_text():
        save_synthetic_tokenizer(str(directory))
        tok = AutoTokenizer.from_pretrained(str(directory))
        add_pixellm_tokens(tok, codebook_tokens(2, num_codebook_tokens // 2))
        tok.save_pretrained(str(directory))
    return str(directory)


def training_items(dicts: list, name: str, metadata=None) -> list:
    """The training items of data set ``name`` (what :class:`PixelLMTrainLoader` draws and the mapper maps).

    * MUSE-format multi-target dicts (``questions``) and LLaVA conversations (``conversations``): as they are;
    * referring records (``sentences`` + ``annotations``): grouped per image (a list per image),
      converted to multi-target questions by the mapper at every draw, with the draw's RNG;
    * semantic dicts (``task == "semantic"`` in the dicts or the metadata): each dict with the data
      set's ``stuff_classes`` and ``ignore_label`` (default 255) attached, converted to class
      questions by the mapper at every draw (:func:`~pixellm.data.muse.multi_target_from_semantic`).

    Args:
        metadata: the data set's metadata (anything with ``.get``); default ``MetadataCatalog.get(name)``.
    """
    if not dicts or "questions" in dicts[0] or "conversations" in dicts[0]:
        return dicts
    if "sentences" in dicts[0] and "annotations" in dicts[0]:
        by_image: dict = {}
        for d in dicts:
            by_image.setdefault(d["file_name"], []).append(d)
        return list(by_image.values())
    meta = MetadataCatalog.get(name) if metadata is None else metadata
    if dicts[0].get("task") == "semantic" or meta.get("task", None) == "semantic":
        return _semantic_items(dicts, name, meta)
    raise ValueError(f"data set {name!r}: PixelLM trains on MUSE-format, referring, semantic (task 'semantic') or "
                     f"LLaVA-conversation dicts (got keys {sorted(dicts[0])})")


def _semantic_items(dicts: list, name: str, meta) -> list:
    classes = meta.get("stuff_classes", None)
    if not classes:
        raise ValueError(f"semantic data set {name!r}: its metadata has no 'stuff_classes' (the class name of each "
                         "label value), needed to name the targets")
    missing = [i for i, d in enumerate(dicts) if not d.get("sem_seg_file_name")]
    if missing:
        raise ValueError(f"semantic data set {name!r}: {len(missing)} dicts have no 'sem_seg_file_name' (the label-map "
                         f"PNG), e.g. dict {missing[0]} ({dicts[missing[0]].get('file_name')!r})")
    classes = tuple(str(c) for c in classes)  # one shared tuple for every dict
    ignore = int(meta.get("ignore_label", 255))
    return [dict(d, task="semantic", stuff_classes=classes, ignore_label=ignore) for d in dicts]


class PixelLMTrainLoader:
    """Infinite batches of mapped dicts drawn from several data sets with fixed ratios.

    Each batch is ``ims_per_batch`` images; each image's data set is drawn with probability
    proportional to ``ratios`` (official mixture 2:9:2:4 for sem_seg / refer_seg / vqa / MUSE), the
    image uniformly. Deterministic in (seed, step); ``state_dict`` / ``load_state_dict`` resume it.
    Items the mapper rejects (every question over the length limit; a label map with no class) are
    replaced by another draw.
    """

    def __init__(self, datasets: list[list[dict]], ratios, mapper, ims_per_batch: int, seed: int = 0):
        if len(datasets) != len(ratios) or not datasets:
            raise ValueError(f"{len(datasets)} data sets but ratios {list(ratios)}")
        if any(len(d) == 0 for d in datasets):
            raise ValueError("an empty training data set")
        p = np.asarray(ratios, dtype=np.float64)
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"ratios must be >= 0 with a positive sum, got {list(ratios)}")
        self.datasets, self.p = datasets, p / p.sum()
        self.mapper, self.ims_per_batch, self.seed = mapper, int(ims_per_batch), int(seed)
        self.step = 0

    def __iter__(self):
        while True:
            rng = np.random.default_rng([self.seed, self.step])
            batch = []
            while len(batch) < self.ims_per_batch:
                d = self.datasets[int(rng.choice(len(self.datasets), p=self.p))]
                x = self.mapper(d[int(rng.integers(len(d)))], rng)
                if x is not None:
                    batch.append(x)
            self.step += 1
            yield batch

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])
