#!/usr/bin/env python
"""Pascal VOC 2012 -> VOC-20 (no background) in the OV-segmentation layout ``pascal_voc_d2/``.

Input ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/<split>.txt}``.
Output ``pascal_voc_d2/images/<dir>/*.jpg`` and ``pascal_voc_d2/annotations_pascal20/<dir>/*.png``
with background 0 -> 255 (ignored), class k (1..20) -> k - 1, 255 kept (dir: training / validation).

    python datasets/prepare_pascal_voc20.py [--root DIR] [--splits val]
"""
import os
import shutil

import numpy as np
from PIL import Image
from tqdm import tqdm

from psalm.data.datasets.prepare_utils import prepare_parser, require_input, setup_logging

DIRS = {"train": "training", "val": "validation"}


def convert_label(label: np.ndarray) -> np.ndarray:
    out = label.astype(np.int32) - 1
    out[(label == 0) | (label == 255)] = 255
    return out.astype(np.uint8)


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--splits", nargs="+", default=["val"], choices=list(DIRS))
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    voc = os.path.join(args.root, "VOCdevkit", "VOC2012")
    for split in args.splits:
        list_file = require_input(os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt"),
                                  "VOCtrainval_11-May-2012.tar")
        with open(list_file) as f:
            names = [x.strip() for x in f if x.strip()]
        img_out = os.path.join(args.root, "pascal_voc_d2", "images", DIRS[split])
        ann_out = os.path.join(args.root, "pascal_voc_d2", "annotations_pascal20", DIRS[split])
        os.makedirs(img_out, exist_ok=True)
        os.makedirs(ann_out, exist_ok=True)
        for n in tqdm(names, desc=split):
            label = np.asarray(Image.open(os.path.join(voc, "SegmentationClass", n + ".png")))  # palette indices
            Image.fromarray(convert_label(label)).save(os.path.join(ann_out, n + ".png"))
            shutil.copy2(os.path.join(voc, "JPEGImages", n + ".jpg"), os.path.join(img_out, n + ".jpg"))
        log.info("%s: %d images -> %s", split, len(names), ann_out)


if __name__ == "__main__":
    main()
