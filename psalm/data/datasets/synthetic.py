"""The built-in synthetic data set (:mod:`psalm.data.synthetic`), registered for every task.

Names (``split`` in ``train``, ``val``, ``test``); the files are generated on first use under
``DATASETS.SYNTHETIC.ROOT`` / ``$PSALM_SYNTHETIC_DIR`` / ``./datasets/psalm_synthetic``.
``val`` is the dev split (every choice is made there), ``test`` is for reported figures only and has
its own seed (``DATASETS.SYNTHETIC.TEST_SEED``; :mod:`psalm.data.synthetic`):

| name | task | evaluator |
|---|---|---|
| ``psalm_synthetic_{split}_panoptic`` | panoptic (6 classes: 4 shapes + wall, floor) | PQ + thing AP + mIoU |
| ``psalm_synthetic_{split}_instance`` | instance (4 shape classes) | mask AP |
| ``psalm_synthetic_{split}_semantic`` | semantic (6 classes) | mIoU |
| ``psalm_synthetic_{split}_referring[_per_ref]`` | referring (one sample per sentence / per object) | cIoU, gIoU |
| ``psalm_synthetic_{split}_gres[_per_ref]`` | gres (multi-target and no-target expressions) | cIoU, gIoU, N-acc |
| ``psalm_synthetic_{split}_interactive`` | interactive (point / scribble / box / mask per object) | mIoU |
| ``psalm_synthetic_{val,test}_interactive_{point,scribble,box,mask}`` | interactive, one prompt type | mIoU |
| ``psalm_synthetic_{split}_caption`` | caption (stage-1 alignment, LLaVA format) | none |

Dicts follow docs/DESIGN.md and are built with the shared loaders of the real data sets (COCO
instance / referring / interactive / LLaVA formats); only the panoptic and semantic loaders are
small local ones, because the synthetic images are PNG (detectron2's panoptic loader assumes JPEG).
"""
from __future__ import annotations

import json
import os

from detectron2.data.datasets.coco import load_sem_seg

from psalm.data import synthetic as syn

from ._common import category_id_maps, load_json, log_loaded, register_lazy
from .coco import load_coco_instances_json
from .coco_interactive import PROMPT_TYPES, load_coco_interactive
from .llava import load_llava_json
from .refcoco import PROTOCOLS, load_referring_json

__all__ = ["register_synthetic", "synthetic_spec_from_cfg", "prepare_synthetic_for_cfg", "SYNTHETIC_PREFIX"]

SYNTHETIC_PREFIX = "psalm_synthetic_"
_PREPARE = "psalm.data.synthetic.prepare_synthetic (runs automatically on first use)"
_THING_IDS = {c["id"]: i for i, c in enumerate(syn.CATEGORIES) if c["isthing"]}


def synthetic_metadata(things_only: bool = False) -> dict:
    cats = [c for c in syn.CATEGORIES if c["isthing"] or not things_only]
    return {
        "prompt_class_names": [c["name"] for c in cats],
        "prompt_is_thing": [bool(c["isthing"]) for c in cats],
        "prompt_class_names_source": "psalm_synthetic",
        "thing_classes": [c["name"] for c in cats if c["isthing"]],
        "thing_colors": [c["color"] for c in cats if c["isthing"]],
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": dict(_THING_IDS),
        # every class, things too (Mask2Former convention: SemSegEvaluator must know every label)
        "stuff_dataset_id_to_contiguous_id": category_id_maps(cats)[1],
        "ignore_label": 255,
        "label_divisor": 1000,
    }


def _paths(root: str, split: str) -> dict:
    d = syn.split_dir(root, split)
    return {
        "image_root": os.path.join(d, "images"),
        "panoptic_root": os.path.join(d, "panoptic"),
        "sem_seg_root": os.path.join(d, "semantic"),
        **{f"{k}_json": os.path.join(d, f"{k}.json") for k in
           ("panoptic", "instances", "referring", "gres", "interactive", "caption")},
    }


def _load_panoptic(name: str, p: dict) -> list[dict]:
    data = load_json(p["panoptic_json"], name, _PREPARE)
    isthing = {c["id"]: bool(c["isthing"]) for c in data["categories"]}
    contiguous = {c["id"]: i for i, c in enumerate(syn.CATEGORIES)}
    images = {img["id"]: img for img in data["images"]}
    out = []
    for ann in data["annotations"]:
        img = images[ann["image_id"]]
        out.append({
            "file_name": os.path.join(p["image_root"], img["file_name"]),
            "height": img["height"],
            "width": img["width"],
            "image_id": img["id"],
            "task": "panoptic",
            "pan_seg_file_name": os.path.join(p["panoptic_root"], ann["file_name"]),
            "sem_seg_file_name": os.path.join(p["sem_seg_root"], ann["file_name"]),
            "segments_info": [
                dict(s, category_id=contiguous[s["category_id"]], isthing=isthing[s["category_id"]])
                for s in ann["segments_info"]
            ],
        })
    log_loaded(name, len(out), "images")
    return out


def _load_semantic(name: str, p: dict) -> list[dict]:
    dicts = load_sem_seg(p["sem_seg_root"], p["image_root"], gt_ext="png", image_ext="png")
    for d in dicts:
        d["task"] = "semantic"
        d["image_id"] = int(os.path.splitext(os.path.basename(d["file_name"]))[0])
    log_loaded(name, len(dicts), "images")
    return dicts


def _synthetic_categories(load, instances_json: str):
    """Wrap a shared loader (which maps category ids with the COCO table) so that every annotation
    gets the synthetic contiguous id of its instance, looked up by annotation id."""

    def wrapped():
        dicts = load()
        with open(instances_json, encoding="utf-8") as f:
            cat = {a["id"]: _THING_IDS[a["category_id"]] for a in json.load(f)["annotations"]}
        for d in dicts:
            for a in d.get("annotations", []):
                a["category_id"] = cat[a["id"]]
        return dicts

    return wrapped


def register_synthetic(root: str | None = None, spec: syn.SyntheticSpec | None = None) -> list[str]:
    """(Re-)register every ``psalm_synthetic_*`` name for the data of ``spec`` under ``root``."""
    root = os.path.abspath(root or syn.default_root())
    spec = spec or syn.SyntheticSpec()
    names = []

    def reg(name, task, evaluator_type, load, **meta):
        def loader():
            syn.prepare_synthetic(root, spec, tokenizer=False)
            return load()

        register_lazy(name, loader, task=task, evaluator_type=evaluator_type, synthetic_root=root, **meta)
        names.append(name)

    for split in syn.SPLITS:
        p = _paths(root, split)
        base = f"{SYNTHETIC_PREFIX}{split}_"
        full, things = synthetic_metadata(), synthetic_metadata(things_only=True)
        reg(base + "panoptic", "panoptic", "coco_panoptic_seg", lambda n=base + "panoptic", p=p: _load_panoptic(n, p),
            image_root=p["image_root"], panoptic_root=p["panoptic_root"], panoptic_json=p["panoptic_json"],
            sem_seg_root=p["sem_seg_root"], json_file=p["instances_json"], **full)
        reg(base + "instance", "instance", "coco", lambda n=base + "instance", p=p: load_coco_instances_json(
            p["instances_json"], p["image_root"], _THING_IDS, n, _PREPARE), image_root=p["image_root"],
            json_file=p["instances_json"], **things)
        reg(base + "semantic", "semantic", "sem_seg", lambda n=base + "semantic", p=p: _load_semantic(n, p),
            image_root=p["image_root"], sem_seg_root=p["sem_seg_root"],
            **{k: v for k, v in full.items() if k != "label_divisor"})
        for task in ("referring", "gres"):
            for protocol in PROTOCOLS:
                name = base + task + ("_per_ref" if protocol == "per_ref" else "")
                reg(name, task, task, _synthetic_categories(lambda n=name, t=task, pr=protocol, p=p: load_referring_json(
                    p[f"{t}_json"], p["image_root"], n, pr, t, _PREPARE), p["instances_json"]), protocol=protocol,
                    json_file=p[f"{task}_json"], image_root=p["image_root"], **things)
        types = (None,) + (PROMPT_TYPES if split != "train" else ())
        for pt in types:
            name = base + "interactive" + (f"_{pt}" if pt else "")
            reg(name, "interactive", "interactive", _synthetic_categories(lambda n=name, pt=pt, p=p: load_coco_interactive(
                p["interactive_json"], p["image_root"], n, pt), p["instances_json"]), prompt_type=pt or "any",
                json_file=p["interactive_json"], image_root=p["image_root"], **things)
        reg(base + "caption", "caption", "none", lambda n=base + "caption", p=p, d=syn.split_dir(root, split):
            load_llava_json(p["caption_json"], d, n, "caption"), json_file=p["caption_json"],
            image_root=p["image_root"])
    return names


def synthetic_spec_from_cfg(cfg) -> syn.SyntheticSpec:
    s = cfg.DATASETS.SYNTHETIC
    return syn.SyntheticSpec(seed=s.SEED, image_size=s.IMAGE_SIZE, num_train=s.NUM_TRAIN, num_val=s.NUM_VAL,
                             num_test=s.NUM_TEST, test_seed=s.TEST_SEED,
                             small_radius=tuple(s.SMALL_RADIUS), large_radius=tuple(s.LARGE_RADIUS))


def prepare_synthetic_for_cfg(cfg) -> str | None:
    """If ``cfg`` uses ``psalm_synthetic_*`` data: generate it (once), register it with the config's
    spec, and make sure ``MODEL.PSALM.TOKENIZER`` exists (the tiny tokenizer is written there when
    missing). Returns the data root, or None when the config uses no synthetic data."""
    used = [n for n in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if n.startswith(SYNTHETIC_PREFIX)]
    if not used:
        return None
    root = os.path.abspath(cfg.DATASETS.SYNTHETIC.ROOT or syn.default_root())
    spec = synthetic_spec_from_cfg(cfg)
    syn.prepare_synthetic(root, spec, tokenizer=True)
    register_synthetic(root, spec)
    tok = cfg.MODEL.PSALM.TOKENIZER
    if tok and not os.path.isfile(os.path.join(tok, "tokenizer_config.json")):
        syn.save_synthetic_tokenizer(tok)
    return root
