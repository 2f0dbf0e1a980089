#!/usr/bin/env python
"""COCO-Interactive: COCO 2017 instances + generated point / scribble / box / mask prompts.

Generation (``psalm.data.visual_prompts.generate_visual_prompts``, the official builder's rules) is
seeded per annotation with ``numpy.random.default_rng([seed, annotation id])``: the output does not
depend on order or ``--workers``, and the val file is frozen for a given seed. Crowd annotations
are skipped unless ``--include-crowd``; images without any prompt are left out, and so are
annotations without a valid polygon (< 3 points or odd length: no prompt can be drawn).

Input: ``coco/annotations/instances_{split}2017.json`` (the official builder read ``annotation/``).
Output: ``coco/coco_interactive_{split}_psalm.json`` (COCO format; annotations carry
``visual_prompts`` {type: RLE} with the non-empty types only).

``--from-official FILE`` instead converts the official released ``coco_interactive_*_psalm.json``
(records with ``image``, ``image_info``, ``anns`` carrying ``point_visual_prompt_mask`` ...), to
evaluate on exactly the prompts the paper used.

    python datasets/prepare_coco_interactive.py --split val [--seed 0] [--workers 2]
"""
import functools
import os

import numpy as np
from pycocotools import mask as mask_utils

from psalm.data.datasets.coco_interactive import PROMPT_TYPES, interactive_json_path
from psalm.data.datasets.prepare_utils import map_items, prepare_parser, read_json, setup_logging, write_json
from psalm.data.visual_prompts import generate_visual_prompts, rle_area, valid_polygons

OFFICIAL_KEYS = {t: f"{t}_visual_prompt_mask" for t in PROMPT_TYPES}


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    seg = ann["segmentation"]
    if isinstance(seg, list):
        seg = valid_polygons(seg)  # degenerate polygons cover nothing (pycocotools would read 4 values as a box)
        if not seg:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def prompts_for_image(item, seed: int, min_area: int):
    """(image, its annotations) -> annotations with ``visual_prompts`` (those with at least one)."""
    img, anns = item
    out = []
    for ann in anns:
        rng = np.random.default_rng([seed, int(ann["id"])])
        prompts = generate_visual_prompts(annotation_mask(ann, img["height"], img["width"]), rng, min_area=min_area)
        if prompts:
            out.append(dict(ann, visual_prompts=prompts))
    return img, out


def generate(instances: dict, seed: int, min_area: int = 5, include_crowd: bool = False, workers: int = 1,
             max_images: int | None = None) -> dict:
    per_image = {}
    for a in instances["annotations"]:
        if a.get("iscrowd", 0) and not include_crowd:
            continue
        per_image.setdefault(a["image_id"], []).append(a)
    items = [(img, per_image[img["id"]]) for img in instances["images"] if img["id"] in per_image]
    if max_images is not None:
        items = items[:max_images]
    work = functools.partial(prompts_for_image, seed=seed, min_area=min_area)
    images, annotations = [], []
    results = map_items(work, items, workers, desc="prompts", chunksize=8)
    for img, anns in results:
        if anns:
            images.append({k: img[k] for k in ("id", "file_name", "height", "width")})
            annotations += anns
    return {"images": images, "annotations": annotations, "categories": instances["categories"]}


def convert_official(records: list) -> dict:
    """Official released records -> our COCO-Interactive format (empty prompts dropped)."""
    images, annotations = {}, []
    for rec in records:
        info = rec["image_info"]
        images[info["id"]] = {"id": info["id"], "file_name": info.get("file_name", rec.get("image")),
                              "height": info["height"], "width": info["width"]}
        for ann in rec["anns"]:
            prompts = {}
            for t, key in OFFICIAL_KEYS.items():
                rle = ann.get(key)
                if rle and rle_area(rle) > 0:
                    prompts[t] = {"counts": rle["counts"], "size": list(rle["size"])}
            if not prompts:
                continue
            keep = {k: v for k, v in ann.items() if k not in OFFICIAL_KEYS.values()}
            keep["image_id"] = info["id"]
            keep["visual_prompts"] = prompts
            annotations.append(keep)
    return {"images": list(images.values()), "annotations": annotations, "categories": []}


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--split", choices=["train", "val"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-area", type=int, default=5, help="components with <= this many pixels get no prompt")
    parser.add_argument("--include-crowd", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images (debugging)")
    parser.add_argument("--from-official", default=None, help="convert this official coco_interactive_*_psalm.json")
    parser.add_argument("--output", default=None, help="default: <root>/coco/coco_interactive_<split>_psalm.json")
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    output = args.output or interactive_json_path(args.root, args.split)
    if args.from_official:
        doc = convert_official(read_json(args.from_official, "the official COCO-Interactive release"))
        doc["info"] = {"source": os.path.basename(args.from_official), "generator": "official release"}
    else:
        src = os.path.join(args.root, "coco", "annotations", f"instances_{args.split}2017.json")
        instances = read_json(src, "COCO 2017 instance annotations (annotations_trainval2017.zip)")
        doc = generate(instances, args.seed, args.min_area, args.include_crowd, args.workers, args.max_images)
        doc["info"] = {"source": f"instances_{args.split}2017.json", "generator": "psalm.data.visual_prompts",
                       "seed": args.seed, "min_area": args.min_area, "include_crowd": args.include_crowd}
    write_json(output, doc, log)
    counts = {t: sum(t in a["visual_prompts"] for a in doc["annotations"]) for t in PROMPT_TYPES}
    log.info("%d images, %d annotations; prompts per type: %s", len(doc["images"]), len(doc["annotations"]), counts)


if __name__ == "__main__":
    main()
