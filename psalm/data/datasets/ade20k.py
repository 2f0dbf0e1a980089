"""ADE20K-150 (SceneParsing, ``ADEChallengeData2016``): semantic, instance and panoptic.

| name | task / evaluator | files under ``ADEChallengeData2016/`` |
|---|---|---|
| ``ade20k_sem_seg_{train,val}_psalm`` | semantic / mIoU | ``images/{training,validation}``, ``annotations_detectron2/...`` (prepare_ade20k_sem_seg.py) |
| ``ade20k_instance_{train,val}_psalm`` | instance / AP | ``ade20k_instance_{train,val}.json`` (Mask2Former's prepare_ade20k_ins_seg.py) |
| ``ade20k_panoptic_{train,val}_psalm`` | panoptic / PQ | ``ade20k_panoptic_{train,val}.json`` + ``ade20k_panoptic_{train,val}/`` (Mask2Former's prepare_ade20k_pan_seg.py) |

Class names: the OpenSeg / FC-CLIP synonym lists the official model was evaluated with
(``psalm/data/class_names/ade20k_150.json``); instance: its 100 thing classes. Category ids are the
0-based ADE-150 ids used by those files.
"""
from __future__ import annotations

import os

from detectron2.data.datasets.coco import load_sem_seg

from psalm.data.class_names import load_categories

from ._common import category_id_maps, datasets_root, log_loaded, register_lazy, require_path
from .coco import image_id_from_file_name, load_coco_instances_json, load_panoptic_json

M2F_HINT = "Mask2Former's datasets/{} (needs ADEChallengeData2016/annotations_instance; see datasets/README.md)"


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
    for split, dirname in (("train", "training"), ("val", "validation")):
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
                M2F_HINT.format("prepare_ade20k_ins_seg.py"),
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
                    pan_json, image_root, pan_root, meta, name, M2F_HINT.format("prepare_ade20k_pan_seg.py")
                )
            ],
            task="panoptic", evaluator_type="ade20k_panoptic_seg", image_root=image_root,
            panoptic_root=pan_root, panoptic_json=pan_json, sem_seg_root=sem_root,
            # thing AP of the panoptic run reads the instance json (same images, 0-based ADE-150 ids)
            json_file=json_file, instance_json_prepare=M2F_HINT.format("prepare_ade20k_ins_seg.py"), **meta,
        )
