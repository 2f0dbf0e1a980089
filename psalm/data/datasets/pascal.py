"""Pascal Context 59 / 459 and Pascal VOC 20 (open-vocabulary semantic segmentation, Table 11).

Layout of the OV-segmentation literature (FC-CLIP / ODISE / the official PSALM eval):

| name | files | ignore |
|---|---|---|
| ``pascal_ctx_59_sem_seg_val_psalm`` | ``pascal_ctx_d2/images/validation/*.jpg``, ``pascal_ctx_d2/annotations_ctx59/validation/*.png`` | 255 |
| ``pascal_ctx_459_sem_seg_val_psalm`` | ``pascal_ctx_d2/annotations_ctx459/validation/*.tif`` (uint16) | 65535 |
| ``pascal_voc_20_sem_seg_val_psalm`` | ``pascal_voc_d2/images/validation``, ``pascal_voc_d2/annotations_pascal20/validation/*.png`` | 255 |

Class names: PC-59 and VOC-20 with their synonym lists verbatim, PC-459 first synonym only
(``psalm/data/class_names/``). VOC-20 has no background class (background pixels are 255).
"""
from __future__ import annotations

import os

from psalm.data.class_names import load_categories

from ._common import datasets_root, register_lazy
from .ade20k import load_sem_seg_dataset

# name -> (benchmark, image dir, gt dir, gt ext, ignore label, prepare hint)
_SETS = {
    "pascal_ctx_59_sem_seg_val_psalm": (
        "pascal_ctx_59", "pascal_ctx_d2/images/validation", "pascal_ctx_d2/annotations_ctx59/validation",
        "png", 255, "python datasets/prepare_pascal_context.py",
    ),
    "pascal_ctx_459_sem_seg_val_psalm": (
        "pascal_ctx_459", "pascal_ctx_d2/images/validation", "pascal_ctx_d2/annotations_ctx459/validation",
        "tif", 65535, "python datasets/prepare_pascal_context.py",
    ),
    "pascal_voc_20_sem_seg_val_psalm": (
        "pascal_voc_20", "pascal_voc_d2/images/validation", "pascal_voc_d2/annotations_pascal20/validation",
        "png", 255, "python datasets/prepare_pascal_voc20.py",
    ),
}


def register_pascal(root: str | None = None) -> None:
    root = datasets_root(root)
    for name, (bench, img, gt, ext, ignore, prepare) in _SETS.items():
        cats = load_categories(bench)
        image_root, gt_root = os.path.join(root, img), os.path.join(root, gt)
        register_lazy(
            name,
            lambda name=name, image_root=image_root, gt_root=gt_root, ext=ext, prepare=prepare: load_sem_seg_dataset(
                gt_root, image_root, name, prepare, gt_ext=ext
            ),
            task="semantic", evaluator_type="sem_seg", image_root=image_root, sem_seg_root=gt_root,
            ignore_label=ignore, prompt_class_names=[c["name"] for c in cats], prompt_class_names_source=bench,
            prompt_is_thing=[bool(c["isthing"]) for c in cats],
            stuff_classes=[c["name"] for c in cats], stuff_colors=[c["color"] for c in cats],
            stuff_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
        )
