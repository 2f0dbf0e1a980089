#!/usr/bin/env python
"""ADE20K instance annotations -> COCO instance JSON: ``ADEChallengeData2016/ade20k_instance_{train,val}.json``.

Reads ``images/<split>/*.jpg`` (every image is listed, also those without objects) and
``annotations_instance/<split>/<stem>.png`` (SceneParsing instance release: R = instance-challenge
class 1..100, G = instance id). Each object becomes one annotation with a COCO RLE mask, its tight
``bbox`` and ``area``, ``iscrowd`` 0 and ``category_id`` = its 0-based ADE-150 id (the label space of
``ade20k_instance_metadata()``); image ids are the file stems (``ADE_val_00000001``).

    python datasets/prepare_ade20k_instance.py [--root DIR] [--splits train val] [--workers 4]
"""

import functools
import glob
import os

from PIL import Image

from psalm.data.datasets.ade20k import (
    ADE_SPLIT_DIRS as SPLITS,
    INSTANCE_SOURCE,
    ade20k_instance_metadata,
    instance_challenge_class_map,
    mask_bbox_xywh,
    read_instance_png,
)
from psalm.data.datasets.prepare_utils import map_items, prepare_parser, require_input, setup_logging, write_json
from psalm.data.visual_prompts import encode_rle


def instance_categories() -> list[dict]:
    """The 100 thing categories with their 0-based ADE-150 ids (COCO ``categories`` entries)."""
    meta = ade20k_instance_metadata()
    return [
        {"id": cid, "name": meta["thing_classes"][i], "isthing": 1, "color": meta["thing_colors"][i]}
        for cid, i in meta["thing_dataset_id_to_contiguous_id"].items()
    ]


def image_record(image_path: str, instance_dir: str, class_map: dict) -> tuple[dict, list[dict]]:
    """One image -> (COCO image entry, its annotations without ``id``); errors name the broken file."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    with Image.open(image_path) as im:
        width, height = im.size
    png = os.path.join(instance_dir, stem + ".png")
    if not os.path.isfile(png):
        raise FileNotFoundError(f"instance annotation {png!r} for image {image_path!r} is missing: {INSTANCE_SOURCE}")
    anns = []
    for cat, mask in read_instance_png(png, class_map):
        if mask.shape != (height, width):
            raise ValueError(f"{png!r} is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}")
        anns.append(
            {
                "image_id": stem,
                "category_id": int(cat),
                "iscrowd": 0,
                "bbox": mask_bbox_xywh(mask),
                "area": int(mask.sum()),
                "segmentation": encode_rle(mask),
            }
        )
    return {"id": stem, "file_name": os.path.basename(image_path), "height": height, "width": width}, anns


def convert_split(base: str, split: str, workers: int = 1) -> dict:
    """All images of ``split`` (``train`` / ``val``) -> the COCO instance dict (annotation ids from 1)."""
    dirname = SPLITS[split]
    image_dir = require_input(
        os.path.join(base, "images", dirname), "ADEChallengeData2016.zip (SceneParsing)", is_dir=True
    )
    instance_dir = require_input(os.path.join(base, "annotations_instance", dirname), INSTANCE_SOURCE, is_dir=True)
    files = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))
    work = functools.partial(image_record, instance_dir=instance_dir, class_map=instance_challenge_class_map())
    records = map_items(work, files, workers, desc=f"ade20k instance {split}")
    images, annotations = [], []
    for image, anns in records:  # sorted file order, whatever --workers: deterministic ids
        images.append(image)
        for a in anns:
            annotations.append(dict(a, id=len(annotations) + 1))
    return {
        "info": {"source": f"ADEChallengeData2016 annotations_instance/{dirname}", "category_ids": "0-based ADE-150"},
        "images": images,
        "annotations": annotations,
        "categories": instance_categories(),
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
        write_json(os.path.join(base, f"ade20k_instance_{split}.json"), doc, log)
        log.info("ade20k instance %s: %d images, %d objects", split, len(doc["images"]), len(doc["annotations"]))


if __name__ == "__main__":
    main()
