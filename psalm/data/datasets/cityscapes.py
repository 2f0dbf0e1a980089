"""Cityscapes (fine, val): open-vocabulary instance segmentation (paper Table 11) and semantic.

| name | task / evaluator | files under ``cityscapes/`` |
|---|---|---|
| ``cityscapes_fine_instance_seg_{train,val}_psalm`` | instance / COCO-style AP | ``gtFine/cityscapes_instance_{split}_psalm.json`` (prepare_cityscapes.py) |
| ``cityscapes_fine_sem_seg_{train,val}_psalm`` | semantic / mIoU | ``gtFine/{split}/*/*_gtFine_labelTrainIds.png`` (prepare_cityscapes.py) |

Class names are the raw Cityscapes names (the official prompt-engineering file is commented out).
Instance AP here is COCO-style (pycocotools, 8 thing classes); the Cityscapes benchmark script
(cityscapesScripts) matches and averages differently, so numbers can differ slightly from papers
that used it.
"""
from __future__ import annotations

import glob
import os

from psalm.data.class_names import load_categories

from ._common import datasets_root, log_loaded, register_lazy, require_path
from .coco import load_coco_instances_json

PREPARE = "python datasets/prepare_cityscapes.py"


def cityscapes_instance_json(root: str, split: str) -> str:
    return os.path.join(root, "cityscapes", "gtFine", f"cityscapes_instance_{split}_psalm.json")


def _load_sem_seg(root: str, split: str, dataset_name: str) -> list[dict]:
    image_dir = require_path(os.path.join(root, "cityscapes", "leftImg8bit", split), dataset_name,
                             "download leftImg8bit_trainvaltest.zip", is_dir=True)
    gt_dir = require_path(os.path.join(root, "cityscapes", "gtFine", split), dataset_name,
                          "download gtFine_trainvaltest.zip", is_dir=True)
    out = []
    for img in sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png"))):
        city = os.path.basename(os.path.dirname(img))
        stem = os.path.basename(img)[: -len("_leftImg8bit.png")]
        gt = os.path.join(gt_dir, city, f"{stem}_gtFine_labelTrainIds.png")
        require_path(gt, dataset_name, PREPARE)
        out.append({"file_name": img, "sem_seg_file_name": gt, "image_id": stem, "task": "semantic"})
    log_loaded(dataset_name, len(out), "images")
    return out


def register_cityscapes(root: str | None = None) -> None:
    root = datasets_root(root)
    cats = load_categories("cityscapes")
    things = load_categories("cityscapes_instance")
    for split in ("train", "val"):
        json_file = cityscapes_instance_json(root, split)
        image_root = os.path.join(root, "cityscapes", "leftImg8bit", split)
        name = f"cityscapes_fine_instance_seg_{split}_psalm"
        id_map = {c["id"]: i for i, c in enumerate(things)}  # Cityscapes labelIds 24..33 -> 0..7
        register_lazy(
            name,
            lambda name=name, json_file=json_file, image_root=image_root, id_map=id_map: load_coco_instances_json(
                json_file, image_root, id_map, name, PREPARE
            ),
            task="instance", evaluator_type="coco", json_file=json_file, image_root=image_root,
            prompt_class_names=[c["name"] for c in things], prompt_class_names_source="cityscapes_instance",
            prompt_is_thing=[True] * len(things),
            thing_classes=[c["name"] for c in things], thing_colors=[c["color"] for c in things],
            thing_dataset_id_to_contiguous_id=id_map,
        )
        name = f"cityscapes_fine_sem_seg_{split}_psalm"
        register_lazy(
            name,
            lambda name=name, split=split: _load_sem_seg(root, split, name),
            task="semantic", evaluator_type="sem_seg", ignore_label=255,
            prompt_class_names=[c["name"] for c in cats], prompt_class_names_source="cityscapes",
            prompt_is_thing=[bool(c["isthing"]) for c in cats],
            stuff_classes=[c["name"] for c in cats], stuff_colors=[c["color"] for c in cats],
            stuff_dataset_id_to_contiguous_id={c["id"]: c["trainId"] for c in cats},
        )
