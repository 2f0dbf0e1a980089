"""COCO-Interactive: COCO 2017 instances with point / scribble / box / mask visual prompts.

Prepared file (``datasets/prepare_coco_interactive.py``; seeded, so the val file is frozen):
``coco/coco_interactive_<split>_psalm.json``: COCO instance format whose annotations also carry
``visual_prompts`` = {"point" | "scribble" | "box" | "mask": COCO RLE} (only the non-empty ones).

Names:

* ``coco_interactive_train``: every annotation with at least one prompt (the mapper draws one type
  per annotation, ``INPUT.INTERACTIVE_PROMPT_TYPES``).
* ``coco_interactive_val_{point,scribble,box,mask}``: only annotations that have a prompt of that
  type, and only that prompt. Annotations without one are left out, as in the official evaluation
  (spec 7.2 item 15); the loader logs how many, and images left with none are skipped.

Dict: ``file_name``, ``height``, ``width``, ``image_id``, ``sample_id``, ``task="interactive"``,
``annotations`` (region j of the prompt is the target of annotation j).
"""
from __future__ import annotations

import logging
import os

from psalm.data.class_names import load_categories
from psalm.structures.tasks import PROMPT_TYPES

from ._common import (
    coco_annotation_to_d2,
    contiguous_map,
    datasets_root,
    load_json,
    log_invalid_segmentations,
    log_loaded,
    register_lazy,
    require_path,
)

logger = logging.getLogger(__name__)

PREPARE = "python datasets/prepare_coco_interactive.py"


def interactive_json_path(root: str, split: str) -> str:
    return os.path.join(root, "coco", f"coco_interactive_{split}_psalm.json")


def load_coco_interactive(json_file: str, image_root: str, dataset_name: str, prompt_type: str | None) -> list[dict]:
    """Prepared COCO-Interactive JSON -> per-image dicts; ``prompt_type=None`` keeps every type."""
    if prompt_type is not None and prompt_type not in PROMPT_TYPES:
        raise ValueError(f"prompt type must be one of {PROMPT_TYPES}, got {prompt_type!r}")
    data = load_json(json_file, dataset_name, PREPARE)
    require_path(image_root, dataset_name, "download COCO 2017 images (datasets/README.md)", is_dir=True)
    id_map = contiguous_map(c["id"] for c in load_categories("coco_instance"))
    per_image: dict = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    out, n_dropped, n_kept, n_invalid = [], 0, 0, 0
    for img in data["images"]:
        objs = []
        for a in per_image.get(img["id"], []):
            prompts = a.get("visual_prompts") or {}
            if prompt_type is not None:
                prompts = {prompt_type: prompts[prompt_type]} if prompt_type in prompts else {}
            if not prompts:
                n_dropped += 1
                continue
            obj = coco_annotation_to_d2(
                a, id_map[int(a["category_id"])], visual_prompts={k: dict(v) for k, v in prompts.items()}
            )
            if obj is None:
                n_invalid += 1
                continue
            objs.append(obj)
        if not objs:
            continue
        n_kept += len(objs)
        out.append(
            {
                "file_name": os.path.join(image_root, img["file_name"]),
                "height": img["height"],
                "width": img["width"],
                "image_id": img["id"],
                "sample_id": str(img["id"]),
                "task": "interactive",
                "annotations": objs,
            }
        )
    log_invalid_segmentations(dataset_name, n_invalid)
    if n_dropped:
        logger.info(
            "Data set '%s': %d annotation(s) have no %s prompt and are left out (%d kept)",
            dataset_name, n_dropped, prompt_type or "visual", n_kept,
        )
    log_loaded(dataset_name, len(out), "images")
    return out


def register_coco_interactive(root: str | None = None) -> None:
    root = datasets_root(root)
    thing = [c["name"] for c in load_categories("coco_instance")]
    for split, prompt_types in (("train", (None,)), ("val", PROMPT_TYPES)):
        json_file = interactive_json_path(root, split)
        image_root = os.path.join(root, "coco", f"{split}2017")
        for pt in prompt_types:
            name = f"coco_interactive_{split}" + (f"_{pt}" if pt else "")
            register_lazy(
                name,
                lambda name=name, json_file=json_file, image_root=image_root, pt=pt: load_coco_interactive(
                    json_file, image_root, name, pt
                ),
                task="interactive",
                evaluator_type="interactive",
                prompt_type=pt or "any",
                json_file=json_file,
                image_root=image_root,
                thing_classes=thing,
            )
