#!/usr/bin/env python
"""COCO panoptic PNGs -> 133-class semantic PNGs (the official repo's missing script, spec 5.1).

Reads  ``coco/annotations/panoptic_{split}2017.json`` and ``coco/panoptic_{split}2017/*.png``;
writes ``coco/panoptic_semseg_{split}2017/*.png``: uint8, pixel = contiguous id 0..132 in the
order of ``psalm/data/class_names/coco_panoptic.json`` (things first), 255 = unlabeled.

    python datasets/prepare_coco_semantic_from_panoptic.py [--root DIR] [--splits train val] [--workers 4]
"""
import functools
import os

import numpy as np
from PIL import Image

from psalm.data.class_names import load_categories
from psalm.data.datasets.prepare_utils import map_items, prepare_parser, read_json, require_input, setup_logging


def panoptic_to_semantic(pan_png: str, out_png: str, segments: list, id_map: dict) -> None:
    """One panoptic PNG (id = R + 256 G + 256^2 B) -> semantic PNG (contiguous ids, 255 elsewhere)."""
    rgb = np.asarray(Image.open(pan_png).convert("RGB"), dtype=np.uint32)
    seg_ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    out = np.full(seg_ids.shape, 255, dtype=np.uint8)
    for s in segments:
        out[seg_ids == s["id"]] = id_map[s["category_id"]]
    Image.fromarray(out).save(out_png)


def _work(item, pan_dir, out_dir, id_map):
    ann = item
    panoptic_to_semantic(
        os.path.join(pan_dir, ann["file_name"]), os.path.join(out_dir, ann["file_name"]), ann["segments_info"], id_map
    )


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    id_map = {c["id"]: i for i, c in enumerate(load_categories("coco_panoptic"))}
    for split in args.splits:
        coco = os.path.join(args.root, "coco")
        data = read_json(os.path.join(coco, "annotations", f"panoptic_{split}2017.json"),
                         "COCO panoptic annotations (panoptic_annotations_trainval2017.zip)")
        pan_dir = require_input(os.path.join(coco, f"panoptic_{split}2017"),
                                f"unzip annotations/panoptic_{split}2017.zip into coco/", is_dir=True)
        unknown = {c["id"] for c in data["categories"]} - set(id_map)
        if unknown:
            raise ValueError(f"panoptic_{split}2017.json has categories {sorted(unknown)} that are not COCO panoptic")
        out_dir = os.path.join(coco, f"panoptic_semseg_{split}2017")
        os.makedirs(out_dir, exist_ok=True)
        work = functools.partial(_work, pan_dir=pan_dir, out_dir=out_dir, id_map=id_map)
        anns = data["annotations"]
        map_items(work, anns, args.workers, desc=split)
        log.info("%s: wrote %d semantic PNGs to %s", split, len(anns), out_dir)


if __name__ == "__main__":
    main()
