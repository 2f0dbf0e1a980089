"""LVIS v1 instance segmentation (the paper's "+LVIS" training data; no official PSALM loader exists).

Prepared files (``datasets/prepare_lvis.py``; train and val go to different files, unlike the
official ``bulid_lvis.py``): ``lvis/lvis_v1_{train,val}_psalm.json``, COCO instance format whose
image ``file_name`` is ``train2017/...`` or ``val2017/...`` (parsed from ``coco_url``), relative to
``coco/``.

Names: ``lvis_v1_{train,val}_psalm`` (task ``instance``). Class names: the LVIS v1 category names
with ``_`` replaced by a space (our choice: the paper does not say which names it prompted with).
Evaluation (``evaluator_type="lvis"``) needs the ``lvis`` package (detectron2's LVISEvaluator).
"""
from __future__ import annotations

import os

from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

from ._common import datasets_root, register_lazy
from .coco import load_coco_instances_json


def lvis_metadata() -> dict:
    cats = sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
    names = [c["name"].replace("_", " ") for c in cats]
    return {
        "prompt_class_names": names,
        "prompt_is_thing": [True] * len(names),
        "prompt_class_names_source": "lvis_v1 (detectron2 LVIS_CATEGORIES, '_' -> ' ')",
        "thing_classes": names,
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
        # LVIS evaluates 300 detections per image (the 1203 names run in class chunks, datasets/README.md)
        "detections_per_image": 300,
    }


def lvis_json_path(root: str, split: str) -> str:
    return os.path.join(root, "lvis", f"lvis_v1_{split}_psalm.json")


def register_lvis(root: str | None = None) -> None:
    root = datasets_root(root)
    meta = lvis_metadata()
    image_root = os.path.join(root, "coco")
    for split in ("train", "val"):
        name = f"lvis_v1_{split}_psalm"
        json_file = lvis_json_path(root, split)
        register_lazy(
            name,
            lambda name=name, json_file=json_file: load_coco_instances_json(
                json_file, image_root, meta["thing_dataset_id_to_contiguous_id"], name,
                "python datasets/prepare_lvis.py",
            ),
            task="instance", evaluator_type="lvis", json_file=json_file, image_root=image_root, **meta,
        )
