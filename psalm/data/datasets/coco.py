"""COCO 2017 panoptic / instance / semantic-from-panoptic for PSALM, plus the generic COCO-json loader.

Names (root = $DETECTRON2_DATASETS):

| name | task | files |
|---|---|---|
| ``coco_2017_{train,val}_panoptic_psalm`` | panoptic | ``coco/annotations/panoptic_{s}2017.json``, ``coco/panoptic_{s}2017/``, ``coco/{s}2017/`` |
| ``coco_2017_{train,val}_instance_psalm`` | instance | ``coco/annotations/instances_{s}2017.json``, ``coco/{s}2017/`` |
| ``coco_2017_{train,val}_semantic_psalm`` | semantic | ``coco/panoptic_semseg_{s}2017/`` (prepare_coco_semantic_from_panoptic.py) |

Class names are the raw COCO panoptic names (133) / its 80 thing classes (spec 7.2 item 17).
Panoptic dicts also carry ``sem_seg_file_name`` (133-class semantic PNG) so that the panoptic run
reports mIoU as in Mask2Former / the paper.
"""
from __future__ import annotations

import os

from detectron2.data.datasets.coco import load_sem_seg

from psalm.data.class_names import load_categories

from ._common import (
    category_id_maps,
    coco_annotation_to_d2,
    contiguous_map,
    datasets_root,
    load_json,
    log_invalid_segmentations,
    log_loaded,
    register_lazy,
    require_path,
)

COCO_DOWNLOAD = "download COCO 2017 images and annotations (see datasets/README.md, 'COCO')"
COCO_SEMSEG_PREPARE = "python datasets/prepare_coco_semantic_from_panoptic.py"


def coco_panoptic_metadata() -> dict:
    """detectron2-style metadata of the 133-class COCO panoptic label space (raw names)."""
    cats = load_categories("coco_panoptic")
    names = [c["name"] for c in cats]
    things, every = category_id_maps(cats)
    return {
        "prompt_class_names": names,
        "prompt_is_thing": [bool(c["isthing"]) for c in cats],
        "prompt_class_names_source": "coco_panoptic",
        "thing_classes": [c["name"] for c in cats if c["isthing"]],
        "thing_colors": [c["color"] for c in cats if c["isthing"]],
        "stuff_classes": names,
        "stuff_colors": [c["color"] for c in cats],
        # Mask2Former convention: both map into the 133 contiguous ids; the stuff map holds EVERY
        # class (things too) so that SemSegEvaluator knows every predicted label
        "thing_dataset_id_to_contiguous_id": things,
        "stuff_dataset_id_to_contiguous_id": every,
        "ignore_label": 255,
        "label_divisor": 1000,
    }


def coco_instance_metadata() -> dict:
    cats = load_categories("coco_instance")
    return {
        "prompt_class_names": [c["name"] for c in cats],
        "prompt_is_thing": [True] * len(cats),
        "prompt_class_names_source": "coco_instance",
        "thing_classes": [c["name"] for c in cats],
        "thing_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": contiguous_map(c["id"] for c in cats),
    }


def image_id_from_file_name(file_name: str):
    """COCO-style int id from ``000000139.jpg``; the stem itself when it is not a number."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    return int(stem) if stem.isdigit() else stem


def load_coco_instances_json(
    json_file: str,
    image_root: str,
    id_map: dict[int, int] | None,
    dataset_name: str,
    prepare: str,
    task: str = "instance",
    file_name_key: str = "file_name",
) -> list[dict]:
    """A COCO-format instance JSON -> detectron2 dicts (``annotations`` with contiguous ``category_id``).

    Images without annotations are kept (evaluation needs them; the training loader drops them for
    instance training, as Mask2Former does). Annotations without a valid segmentation (only
    degenerate polygons) are dropped with a logged count, as detectron2 does. Annotations of categories not in
    ``id_map`` are an error (a wrong label space must not be dropped silently). ``id_map=None``
    keeps the ids as they are.
    """
    data = load_json(json_file, dataset_name, prepare)
    require_path(image_root, dataset_name, prepare, is_dir=True)
    anns_per_image: dict = {}
    for ann in data.get("annotations", []):
        anns_per_image.setdefault(ann["image_id"], []).append(ann)
    out, n_invalid = [], 0
    for img in data["images"]:
        objs = []
        for ann in anns_per_image.get(img["id"], []):
            cat = int(ann["category_id"])
            if id_map is not None and cat not in id_map:
                raise ValueError(
                    f"Data set '{dataset_name}': annotation {ann.get('id')} in {json_file!r} has category "
                    f"{cat}, which is not in the registered label space; wrong annotation file?"
                )
            obj = coco_annotation_to_d2(ann, id_map[cat] if id_map is not None else cat)
            if obj is None:
                n_invalid += 1
                continue
            objs.append(obj)
        out.append(
            {
                "file_name": os.path.join(image_root, img[file_name_key]),
                "height": img["height"],
                "width": img["width"],
                "image_id": img["id"],
                "task": task,
                "annotations": objs,
            }
        )
    log_invalid_segmentations(dataset_name, n_invalid)
    log_loaded(dataset_name, len(out), "images")
    return out


def load_panoptic_json(json_file: str, image_root: str, pan_root: str, meta: dict, dataset_name: str, prepare: str,
                       image_ext: str = ".jpg") -> list[dict]:
    """A COCO-panoptic-format JSON -> detectron2 dicts (``segments_info`` with contiguous ids, ``isthing``).

    Like detectron2's ``load_coco_panoptic_json`` but keeps non-integer image ids (ADE20K) and adds
    ``height`` / ``width``. ``meta`` needs ``thing_/stuff_dataset_id_to_contiguous_id``; an id in the
    thing map is a thing, any other id of the stuff map (which may hold every class) is stuff.
    """
    data = load_json(json_file, dataset_name, prepare)
    require_path(pan_root, dataset_name, prepare, is_dir=True)
    require_path(image_root, dataset_name, prepare, is_dir=True)
    things, stuff = meta["thing_dataset_id_to_contiguous_id"], meta["stuff_dataset_id_to_contiguous_id"]
    images = {img["id"]: img for img in data["images"]}
    out = []
    for ann in data["annotations"]:
        img = images[ann["image_id"]]
        segs = []
        for s in ann["segments_info"]:
            cat = int(s["category_id"])
            if cat in things:
                cont, isthing = things[cat], True
            elif cat in stuff:
                cont, isthing = stuff[cat], False
            else:
                raise ValueError(f"Data set '{dataset_name}': segment category {cat} in {json_file!r} is unknown")
            seg = dict(s)
            seg.update(category_id=cont, isthing=isthing, iscrowd=int(s.get("iscrowd", 0)))
            segs.append(seg)
        out.append(
            {
                "file_name": os.path.join(image_root, os.path.splitext(ann["file_name"])[0] + image_ext),
                "height": img["height"],
                "width": img["width"],
                "image_id": ann["image_id"],
                "pan_seg_file_name": os.path.join(pan_root, ann["file_name"]),
                "segments_info": segs,
                "task": "panoptic",
            }
        )
    log_loaded(dataset_name, len(out), "images")
    return out


def _coco_paths(root: str, split: str) -> dict:
    c = os.path.join(root, "coco")
    return {
        "image_root": os.path.join(c, f"{split}2017"),
        "panoptic_json": os.path.join(c, "annotations", f"panoptic_{split}2017.json"),
        "panoptic_root": os.path.join(c, f"panoptic_{split}2017"),
        "instances_json": os.path.join(c, "annotations", f"instances_{split}2017.json"),
        "sem_seg_root": os.path.join(c, f"panoptic_semseg_{split}2017"),
    }


def _load_panoptic(name: str, p: dict, meta: dict) -> list[dict]:
    dicts = load_panoptic_json(
        p["panoptic_json"], p["image_root"], p["panoptic_root"], meta, name,
        COCO_DOWNLOAD + " (unzip panoptic_annotations_trainval2017 and its panoptic_*2017.zip)",
    )
    for d in dicts:
        d["sem_seg_file_name"] = os.path.join(p["sem_seg_root"], os.path.basename(d["pan_seg_file_name"]))
    return dicts


def _load_semantic(name: str, p: dict) -> list[dict]:
    require_path(p["sem_seg_root"], name, COCO_SEMSEG_PREPARE, is_dir=True)
    require_path(p["image_root"], name, COCO_DOWNLOAD, is_dir=True)
    dicts = load_sem_seg(p["sem_seg_root"], p["image_root"], gt_ext="png", image_ext="jpg")
    for d in dicts:
        d["task"] = "semantic"
        d["image_id"] = image_id_from_file_name(d["file_name"])
    log_loaded(name, len(dicts), "images")
    return dicts


def register_coco(root: str | None = None) -> None:
    root = datasets_root(root)
    pan_meta = coco_panoptic_metadata()
    ins_meta = coco_instance_metadata()
    for split in ("train", "val"):
        p = _coco_paths(root, split)
        name = f"coco_2017_{split}_panoptic_psalm"
        register_lazy(
            name,
            lambda name=name, p=p: _load_panoptic(name, p, pan_meta),
            task="panoptic",
            evaluator_type="coco_panoptic_seg",
            image_root=p["image_root"],
            panoptic_root=p["panoptic_root"],
            panoptic_json=p["panoptic_json"],
            sem_seg_root=p["sem_seg_root"],
            json_file=p["instances_json"],  # thing AP of the panoptic run (PanopticThingAPEvaluator)
            instance_json_prepare=COCO_DOWNLOAD,
            **pan_meta,
        )
        name = f"coco_2017_{split}_instance_psalm"
        register_lazy(
            name,
            lambda name=name, p=p: load_coco_instances_json(
                p["instances_json"], p["image_root"], ins_meta["thing_dataset_id_to_contiguous_id"], name, COCO_DOWNLOAD
            ),
            task="instance",
            evaluator_type="coco",
            image_root=p["image_root"],
            json_file=p["instances_json"],
            **ins_meta,
        )
        name = f"coco_2017_{split}_semantic_psalm"
        register_lazy(
            name,
            lambda name=name, p=p: _load_semantic(name, p),
            task="semantic",
            evaluator_type="sem_seg",
            image_root=p["image_root"],
            sem_seg_root=p["sem_seg_root"],
            **{k: v for k, v in pan_meta.items() if k != "label_divisor"},
        )
