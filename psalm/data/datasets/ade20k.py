"""ADE20K-150 (SceneParsing, ``ADEChallengeData2016``): semantic, instance and panoptic.

| name | task / evaluator | files under ``ADEChallengeData2016/`` |
|---|---|---|
| ``ade20k_sem_seg_{train,val}_psalm`` | semantic / mIoU | ``images/{training,validation}``, ``annotations_detectron2/...`` (prepare_ade20k_sem_seg.py) |
| ``ade20k_instance_{train,val}_psalm`` | instance / AP | ``ade20k_instance_{train,val}.json`` (prepare_ade20k_instance.py) |
| ``ade20k_panoptic_{train,val}_psalm`` | panoptic / PQ | ``ade20k_panoptic_{train,val}.json`` + ``ade20k_panoptic_{train,val}/`` (prepare_ade20k_panoptic.py) |

Class names: the OpenSeg / FC-CLIP synonym lists the official model was evaluated with
(``psalm/data/class_names/ade20k_150.json``); instance: its 100 thing classes. Category ids are the
0-based ADE-150 ids used by those files.
"""
from __future__ import annotations

import os

import numpy as np
from detectron2.data.datasets.coco import load_sem_seg
from PIL import Image

from psalm.data.class_names import load_categories

from ._common import category_id_maps, datasets_root, log_loaded, register_lazy, require_path
from .coco import image_id_from_file_name, load_coco_instances_json, load_panoptic_json

M2F_HINT = "python datasets/{} (needs ADEChallengeData2016/annotations_instance; see datasets/README.md)"
# data-set split -> folder under images/, annotations/, annotations_instance/
ADE_SPLIT_DIRS = {"train": "training", "val": "validation"}
INSTANCE_SOURCE = "the ADE20K instance annotations (annotations_instance/, SceneParsing instance challenge release)"


def ade20k_metadata() -> dict:
    """Metadata of the 150-class space (semantic and panoptic sets); both id maps point into it.

    ``stuff_dataset_id_to_contiguous_id`` maps every class, things included (Mask2Former's
    convention, needed by ``SemSegEvaluator``); ``thing_dataset_id_to_contiguous_id`` the 100
    things, whose contiguous ids are NOT 0..99 (they interleave with stuff): panoptic thing AP
    goes through ``psalm.evaluation.panoptic_ap``.
    """
    cats = load_categories("ade20k_150")
    names = [c["name"] for c in cats]
    things, every = category_id_maps(cats)
    return {
        "prompt_class_names": names,
        "prompt_is_thing": [bool(c["isthing"]) for c in cats],
        "prompt_class_names_source": "ade20k_150",
        "stuff_classes": names,
        "stuff_colors": [c["color"] for c in cats],
        "thing_classes": [c["name"] for c in cats if c["isthing"]],
        "thing_colors": [c["color"] for c in cats if c["isthing"]],
        "thing_dataset_id_to_contiguous_id": things,
        "stuff_dataset_id_to_contiguous_id": every,
        "ignore_label": 255,
        "label_divisor": 1000,
    }


def ade20k_instance_metadata() -> dict:
    cats = load_categories("ade20k_150_instance")
    return {
        "prompt_class_names": [c["name"] for c in cats],
        "prompt_is_thing": [True] * len(cats),
        "prompt_class_names_source": "ade20k_150_instance",
        "thing_classes": [c["name"] for c in cats],
        "thing_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }


def instance_challenge_class_map() -> dict[int, int]:
    """Instance-challenge class id (R channel of ``annotations_instance`` PNGs, 1..100) -> 0-based ADE-150 id.

    The 100 classes of the SceneParsing instance challenge are the ADE-150 thing classes in ADE-150
    order (instance class k is the k-th thing; e.g. 1 -> bed (7), 100 -> flag (149)), so this map is
    read off ``ade20k_150.json``'s ``isthing`` flags rather than stored twice.
    """
    return {k + 1: c["id"] for k, c in enumerate(load_categories("ade20k_150_instance"))}


def read_instance_png(path: str, class_map: dict[int, int] | None = None) -> list[tuple[int, np.ndarray]]:
    """Objects of one ``annotations_instance`` PNG as ``[(ade150_id, mask bool [H, W]), ...]``.

    Format (SceneParsing instance devkit): RGB, R = instance-challenge class id (0 = none), G =
    instance id within the image (0 = none; 1, 2, ... per object); B unused. Objects are returned in
    increasing instance id. An instance id painted with several class ids, or a class id outside
    1..100, is an error (corrupt or wrong file).
    """
    class_map = instance_challenge_class_map() if class_map is None else class_map
    arr = np.asarray(Image.open(path))
    if arr.ndim != 3 or arr.shape[2] < 2 or arr.dtype != np.uint8:
        raise ValueError(f"{path!r}: expected an 8-bit RGB instance PNG (R = class, G = instance id), "
                         f"got shape {arr.shape} dtype {arr.dtype}")
    cls, ins = arr[..., 0], arr[..., 1]
    out = []
    for inst_id in np.unique(ins):
        if inst_id == 0:
            continue
        mask = ins == inst_id
        ids = np.unique(cls[mask])
        if len(ids) != 1 or int(ids[0]) not in class_map:
            raise ValueError(f"{path!r}: instance {int(inst_id)} has class id(s) {ids.tolist()}; expected exactly "
                             f"one of 1..{len(class_map)} (is this an annotations_instance PNG?)")
        out.append((class_map[int(ids[0])], mask))
    return out


def mask_bbox_xywh(mask: np.ndarray) -> list[int]:
    """Tight box of a non-empty bool mask [H, W] as COCO ``[x, y, w, h]`` (pixel-inclusive extent)."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def load_sem_seg_dataset(gt_root: str, image_root: str, dataset_name: str, prepare: str,
                         gt_ext: str = "png", image_ext: str = "jpg") -> list[dict]:
    """detectron2's ``load_sem_seg`` with clear missing-folder errors, ``image_id`` and ``task``."""
    require_path(image_root, dataset_name, prepare, is_dir=True)
    require_path(gt_root, dataset_name, prepare, is_dir=True)
    dicts = load_sem_seg(gt_root, image_root, gt_ext=gt_ext, image_ext=image_ext)
    for d in dicts:
        d["task"] = "semantic"
        d["image_id"] = image_id_from_file_name(d["file_name"])
    log_loaded(dataset_name, len(dicts), "images")
    return dicts


def register_ade20k(root: str | None = None) -> None:
    base = os.path.join(datasets_root(root), "ADEChallengeData2016")
    meta = ade20k_metadata()
    ins_meta = ade20k_instance_metadata()
    for split, dirname in ADE_SPLIT_DIRS.items():
        image_root = os.path.join(base, "images", dirname)
        sem_root = os.path.join(base, "annotations_detectron2", dirname)
        name = f"ade20k_sem_seg_{split}_psalm"
        register_lazy(
            name,
            lambda name=name, image_root=image_root, sem_root=sem_root: load_sem_seg_dataset(
                sem_root, image_root, name, "python datasets/prepare_ade20k_sem_seg.py"
            ),
            task="semantic", evaluator_type="sem_seg", image_root=image_root, sem_seg_root=sem_root,
            **{k: v for k, v in meta.items() if k != "label_divisor"},
        )
        json_file = os.path.join(base, f"ade20k_instance_{split}.json")
        name = f"ade20k_instance_{split}_psalm"
        register_lazy(
            name,
            lambda name=name, json_file=json_file, image_root=image_root: load_coco_instances_json(
                json_file, image_root, ins_meta["thing_dataset_id_to_contiguous_id"], name,
                M2F_HINT.format("prepare_ade20k_instance.py"),
            ),
            task="instance", evaluator_type="coco", image_root=image_root, json_file=json_file, **ins_meta,
        )
        pan_json = os.path.join(base, f"ade20k_panoptic_{split}.json")
        pan_root = os.path.join(base, f"ade20k_panoptic_{split}")
        name = f"ade20k_panoptic_{split}_psalm"
        register_lazy(
            name,
            lambda name=name, pan_json=pan_json, pan_root=pan_root, image_root=image_root, sem_root=sem_root: [
                dict(d, sem_seg_file_name=os.path.join(sem_root, os.path.basename(d["pan_seg_file_name"])))
                for d in load_panoptic_json(
                    pan_json, image_root, pan_root, meta, name, M2F_HINT.format("prepare_ade20k_panoptic.py")
                )
            ],
            task="panoptic", evaluator_type="ade20k_panoptic_seg", image_root=image_root,
            panoptic_root=pan_root, panoptic_json=pan_json, sem_seg_root=sem_root,
            # thing AP of the panoptic run reads the instance json (same images, 0-based ADE-150 ids)
            json_file=json_file, instance_json_prepare=M2F_HINT.format("prepare_ade20k_instance.py"), **meta,
        )
