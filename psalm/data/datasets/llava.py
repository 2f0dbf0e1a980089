"""LLaVA data: LLaVA-1.5 instruction mix (stage 2) and LLaVA-pretrain / CC3M captions (stage 1).

Prepared files (``datasets/prepare_llava.py``: samples whose image exists and is readable, with
``<image>`` moved to the start of the first human turn; text-only samples dropped, as the official
``onlyMM`` file):

| name | task | file | images |
|---|---|---|---|
| ``llava_v1_5_mix665k_psalm`` | instruction | ``llava/llava_v1_5_mix665k_psalm.json`` | ``llava/images/`` (coco/, gqa/, ocr_vqa/, textvqa/, vg/) |
| ``llava_pretrain_558k_psalm`` | caption | ``llava/llava_pretrain_558k_psalm.json`` | ``llava/pretrain_images/`` |
| ``llava_cc3m_595k_psalm`` | caption | ``llava/llava_cc3m_595k_psalm.json`` | ``llava/cc3m_images/`` |

Dict: ``file_name``, ``height``, ``width``, ``image_id`` = ``sample_id`` (the record's ``id``),
``task``, ``conversations`` (LLaVA turns [{"from": "human"/"gpt", "value": str}]).
"""
from __future__ import annotations

import os

from ._common import datasets_root, load_json, log_loaded, register_lazy, require_path

_SETS = {
    "llava_v1_5_mix665k_psalm": ("instruction", "llava_v1_5_mix665k_psalm.json", "images"),
    "llava_pretrain_558k_psalm": ("caption", "llava_pretrain_558k_psalm.json", "pretrain_images"),
    "llava_cc3m_595k_psalm": ("caption", "llava_cc3m_595k_psalm.json", "cc3m_images"),
}


def load_llava_json(json_file: str, image_root: str, dataset_name: str, task: str) -> list[dict]:
    data = load_json(json_file, dataset_name, "python datasets/prepare_llava.py")
    require_path(image_root, dataset_name, "download the LLaVA images (datasets/README.md, 'LLaVA')", is_dir=True)
    out = []
    for r in data["samples"]:
        out.append(
            {
                "file_name": os.path.join(image_root, r["image"]),
                "height": r["height"],
                "width": r["width"],
                "image_id": r["id"],
                "sample_id": str(r["id"]),
                "task": task,
                "conversations": [dict(turn) for turn in r["conversations"]],
            }
        )
    log_loaded(dataset_name, len(out), "samples")
    return out


def register_llava(root: str | None = None) -> None:
    base = os.path.join(datasets_root(root), "llava")
    for name, (task, file, images) in _SETS.items():
        json_file, image_root = os.path.join(base, file), os.path.join(base, images)
        register_lazy(
            name,
            lambda name=name, json_file=json_file, image_root=image_root, task=task: load_llava_json(
                json_file, image_root, name, task
            ),
            task=task, evaluator_type="none", json_file=json_file, image_root=image_root,
        )
