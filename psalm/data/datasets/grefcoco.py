"""gRefCOCO (generalized referring: multi-target and no-target expressions).

Prepared file (``datasets/prepare_grefcoco.py``, from ``grefs(unc).json`` + ``instances.json``):
``refer_seg/grefcoco/grefcoco_<split>.json``, same format and loader as RefCOCO
(:func:`psalm.data.datasets.refcoco.load_referring_json`) with ``task="gres"``; every dict has
``no_target`` (True when the expression refers to nothing, ``annotations == []``).

Names: ``grefcoco_{train,val,testA,testB}`` (one sample per sentence, the GRES / ReLA protocol) and
``grefcoco_{split}_per_ref`` (all sentences of a ref merged, as the official PSALM evaluation).
"""
from __future__ import annotations

import os

from ._common import datasets_root, register_lazy
from .refcoco import PROTOCOLS, coco2014_image_root, load_referring_json, referring_metadata

GREFCOCO_SPLITS = ("train", "val", "testA", "testB")


def grefcoco_json_path(root: str, split: str) -> str:
    return os.path.join(root, "refer_seg", "grefcoco", f"grefcoco_{split}.json")


def register_grefcoco(root: str | None = None) -> None:
    root = datasets_root(root)
    image_root = coco2014_image_root(root)
    meta = referring_metadata()
    for split in GREFCOCO_SPLITS:
        json_file = grefcoco_json_path(root, split)
        for protocol in PROTOCOLS:
            name = f"grefcoco_{split}" + ("_per_ref" if protocol == "per_ref" else "")
            register_lazy(
                name,
                lambda name=name, json_file=json_file, protocol=protocol: load_referring_json(
                    json_file, image_root, name, protocol, "gres", "python datasets/prepare_grefcoco.py"
                ),
                task="gres",
                evaluator_type="gres",
                protocol=protocol,
                json_file=json_file,
                image_root=image_root,
                **meta,
            )
