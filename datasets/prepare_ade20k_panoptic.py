#!/usr/bin/env python
"""ADE20K semantic + instance annotations -> COCO panoptic: ``ade20k_panoptic_{train,val}.json`` + PNG folders.

Inputs under ``ADEChallengeData2016/``: ``images/<split>/*.jpg``, ``annotations/<split>/<stem>.png``
(ADE-150 semantic labels, 0 = other, k = class k - 1) and ``annotations_instance/<split>/<stem>.png``
(R = instance-challenge class 1..100, G = instance id). Per image:

* stuff: one segment per ADE-150 stuff class present in the semantic label;
* things: one segment per object of the instance PNG, painted over the stuff (the two releases
  overlap a little); thing-class pixels of the semantic label with no object stay void (id 0).

Outputs: ``ade20k_panoptic_<split>/<stem>.png`` (RGB, segment id = R + 256 G + 256^2 B) and the
JSON (``images`` / ``annotations`` with ``segments_info`` / all 150 ``categories``), category ids
0-based ADE-150 (``ade20k_metadata()``), image ids the file stems. Segment id =
``(category_id + 1) * 1000 + k`` (k = 0 for stuff, 1, 2, ... for the objects of a class); ``area`` and
``bbox`` are measured on the written PNG, and a stuff segment fully covered by objects is dropped.

    python datasets/prepare_ade20k_panoptic.py [--root DIR] [--splits train val] [--workers 4]
"""

import functools
import glob
import os

import numpy as np
from PIL import Image

from psalm.data.datasets.ade20k import (
    ADE_SPLIT_DIRS as SPLITS,
    INSTANCE_SOURCE,
    ade20k_metadata,
    instance_challenge_class_map,
    mask_bbox_xywh,
    read_instance_png,
)
from psalm.data.datasets.prepare_utils import map_items, prepare_parser, require_input, setup_logging, write_json

SEGMENT_ID_STRIDE = 1000
SEMANTIC_SOURCE = "ADEChallengeData2016.zip (SceneParsing)"


def panoptic_categories() -> list[dict]:
    """All 150 ADE-150 categories (0-based ids, ``isthing``, ``color``) for the panoptic JSON."""
    meta = ade20k_metadata()
    return [
        {
            "id": cid,
            "name": meta["stuff_classes"][i],
            "isthing": int(meta["prompt_is_thing"][i]),
            "color": meta["stuff_colors"][i],
        }
        for cid, i in meta["stuff_dataset_id_to_contiguous_id"].items()
    ]


def build_panoptic(semantic: np.ndarray, objects: list, is_thing: list) -> tuple[np.ndarray, list[dict]]:
    """One image -> (segment-id map uint32 [H, W], ``segments_info``).

    Args:
        semantic: uint8 [H, W] raw ADE label (0 = other, k = ADE-150 class k - 1).
        objects: ``[(ade150_id, bool mask [H, W]), ...]`` from ``read_instance_png``.
        is_thing: ``is_thing[c]`` for every 0-based ADE-150 id ``c``.
    """
    ids = np.zeros(semantic.shape, dtype=np.uint32)
    cats: dict[int, int] = {}
    for label in np.unique(semantic):
        cat = int(label) - 1
        if cat >= len(is_thing):
            raise ValueError(f"semantic label {int(label)} is outside ADE-150 (1..{len(is_thing)}; 0 = other)")
        if label == 0 or is_thing[cat]:
            continue
        seg_id = (cat + 1) * SEGMENT_ID_STRIDE
        ids[semantic == label] = seg_id
        cats[seg_id] = cat
    per_class: dict[int, int] = {}
    for cat, mask in objects:
        per_class[cat] = per_class.get(cat, 0) + 1
        if per_class[cat] >= SEGMENT_ID_STRIDE:
            raise ValueError(f"more than {SEGMENT_ID_STRIDE - 1} objects of class {cat} in one image")
        seg_id = (cat + 1) * SEGMENT_ID_STRIDE + per_class[cat]
        ids[mask] = seg_id
        cats[seg_id] = cat
    segments = []
    for seg_id, cat in cats.items():
        mask = ids == seg_id
        if mask.any():
            segments.append(
                {
                    "id": int(seg_id),
                    "category_id": cat,
                    "iscrowd": 0,
                    "area": int(mask.sum()),
                    "bbox": mask_bbox_xywh(mask),
                }
            )
    return ids, segments


def image_record(
    image_path: str, semantic_dir: str, instance_dir: str, out_dir: str, class_map: dict, is_thing: list
) -> tuple[dict, dict]:
    """Convert one image, write its panoptic PNG; returns (COCO image entry, panoptic annotation)."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    with Image.open(image_path) as im:
        width, height = im.size
    sem_png, ins_png = os.path.join(semantic_dir, stem + ".png"), os.path.join(instance_dir, stem + ".png")
    if not os.path.isfile(sem_png):
        raise FileNotFoundError(f"semantic label {sem_png!r} for image {image_path!r} is missing: {SEMANTIC_SOURCE}")
    if not os.path.isfile(ins_png):
        raise FileNotFoundError(
            f"instance annotation {ins_png!r} for image {image_path!r} is missing: {INSTANCE_SOURCE}"
        )
    semantic = np.asarray(Image.open(sem_png))
    if semantic.ndim != 2 or semantic.shape != (height, width):
        raise ValueError(f"{sem_png!r}: expected a single-channel {width}x{height} label, got shape {semantic.shape}")
    objects = read_instance_png(ins_png, class_map)
    if objects and objects[0][1].shape != (height, width):
        raise ValueError(
            f"{ins_png!r} is {objects[0][1].shape[1]}x{objects[0][1].shape[0]}, its image {width}x{height}"
        )
    ids, segments = build_panoptic(semantic, objects, is_thing)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(os.path.join(out_dir, stem + ".png"))
    image = {"id": stem, "file_name": os.path.basename(image_path), "height": height, "width": width}
    return image, {"image_id": stem, "file_name": stem + ".png", "segments_info": segments}


def convert_split(base: str, split: str, workers: int = 1) -> dict:
    """All images of ``split`` -> the panoptic JSON dict; PNGs go to ``ade20k_panoptic_<split>/``."""
    dirname = SPLITS[split]
    image_dir = require_input(os.path.join(base, "images", dirname), SEMANTIC_SOURCE, is_dir=True)
    semantic_dir = require_input(os.path.join(base, "annotations", dirname), SEMANTIC_SOURCE, is_dir=True)
    instance_dir = require_input(os.path.join(base, "annotations_instance", dirname), INSTANCE_SOURCE, is_dir=True)
    out_dir = os.path.join(base, f"ade20k_panoptic_{split}")
    os.makedirs(out_dir, exist_ok=True)
    categories = panoptic_categories()
    work = functools.partial(
        image_record,
        semantic_dir=semantic_dir,
        instance_dir=instance_dir,
        out_dir=out_dir,
        class_map=instance_challenge_class_map(),
        is_thing=[bool(c["isthing"]) for c in categories],
    )
    files = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))
    records = map_items(work, files, workers, desc=f"ade20k panoptic {split}")
    return {
        "info": {
            "source": f"ADEChallengeData2016 annotations + annotations_instance/{dirname}",
            "category_ids": "0-based ADE-150",
        },
        "images": [r[0] for r in records],
        "annotations": [r[1] for r in records],
        "categories": categories,
    }


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    base = os.path.join(args.root, "ADEChallengeData2016")
    for split in args.splits:
        doc = convert_split(base, split, args.workers)
        write_json(os.path.join(base, f"ade20k_panoptic_{split}.json"), doc, log)
        n_seg = sum(len(a["segments_info"]) for a in doc["annotations"])
        log.info("ade20k panoptic %s: %d images, %d segments", split, len(doc["images"]), n_seg)


if __name__ == "__main__":
    main()
