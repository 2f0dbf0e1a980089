#!/usr/bin/env python
"""Cityscapes fine -> instance JSON (COCO format, 8 thing classes) and ``*_labelTrainIds.png``.

Input ``cityscapes/gtFine/<split>/<city>/*_gtFine_{instanceIds,labelIds}.png`` and
``cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png``.

* ``cityscapes/gtFine/cityscapes_instance_<split>_psalm.json``: one annotation per thing instance
  (instanceIds value = labelId * 1000 + k); thing pixels without an instance id (value = labelId,
  "group" regions) become one ``iscrowd=1`` annotation per class. ``category_id`` = Cityscapes labelId.
* ``*_gtFine_labelTrainIds.png``: labelId -> trainId (0..18), others 255 (as cityscapesScripts).

    python datasets/prepare_cityscapes.py [--root DIR] [--splits val]
"""
import glob
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from psalm.data.class_names import load_categories
from psalm.data.datasets.cityscapes import cityscapes_instance_json
from psalm.data.datasets.prepare_utils import prepare_parser, require_input, setup_logging, write_json
from psalm.data.visual_prompts import encode_rle


def _ann(mask, ann_id, image_id, cat, crowd):
    ys, xs = np.nonzero(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": int(cat), "iscrowd": int(crowd),
            "segmentation": encode_rle(mask), "area": int(mask.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]}


def instance_annotations(inst: np.ndarray, image_id: str, thing_ids, next_id: int) -> list:
    anns = []
    for v in np.unique(inst):
        v = int(v)
        cat, crowd = (v // 1000, False) if v >= 1000 else (v, True)
        if cat not in thing_ids:
            continue
        anns.append(_ann(inst == v, next_id + len(anns), image_id, cat, crowd))
    return anns


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--splits", nargs="+", default=["val"])
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    cats = load_categories("cityscapes")
    thing_ids = {c["id"] for c in cats if c["isthing"]}
    to_train = np.full(256, 255, dtype=np.uint8)
    for c in cats:
        to_train[c["id"]] = c["trainId"]
    for split in args.splits:
        gt_dir = require_input(os.path.join(args.root, "cityscapes", "gtFine", split), "gtFine_trainvaltest.zip",
                               is_dir=True)
        files = sorted(glob.glob(os.path.join(gt_dir, "*", "*_gtFine_instanceIds.png")))
        images, anns = [], []
        for f in tqdm(files, desc=split):
            stem = os.path.basename(f)[: -len("_gtFine_instanceIds.png")]
            city = os.path.basename(os.path.dirname(f))
            inst = np.asarray(Image.open(f))
            images.append({"id": stem, "file_name": f"{city}/{stem}_leftImg8bit.png",
                           "height": int(inst.shape[0]), "width": int(inst.shape[1])})
            anns += instance_annotations(inst, stem, thing_ids, len(anns) + 1)
            label_ids = np.asarray(Image.open(f.replace("_instanceIds.png", "_labelIds.png")))
            Image.fromarray(to_train[label_ids]).save(f.replace("_instanceIds.png", "_labelTrainIds.png"))
        categories = [{"id": c["id"], "name": c["name"]} for c in cats if c["isthing"]]
        write_json(cityscapes_instance_json(args.root, split),
                   {"info": {"source": f"gtFine/{split}"}, "images": images, "annotations": anns,
                    "categories": categories}, log)
        log.info("%s: %d images, %d instances", split, len(images), len(anns))


if __name__ == "__main__":
    main()
