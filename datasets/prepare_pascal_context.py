#!/usr/bin/env python
"""Pascal Context (VOC 2010) -> PC-459 (uint16 .tif) and PC-59 (.png) in the layout ``pascal_ctx_d2/``.

Input ``VOCdevkit/VOC2010/JPEGImages``, the full Pascal-Context labels ``VOCdevkit/VOC2010/trainval/
<name>.mat`` (``LabelMap``: 0 = unlabeled, 1..459 = the 459 classes in alphabetical order) and an
image list (default ``VOCdevkit/VOC2010/ImageSets/Main/<split>.txt``).

* PC-459: label k -> k - 1, 0 -> 65535 (ignore), saved as uint16 TIFF.
* PC-59: the 59 classes are picked from the 459 by name (``diningtable`` is 459's ``table``),
  in PC-59 order, everything else -> 255. This reproduces the Detail-API conversion of the OV
  literature as far as we could check (same classes, same order); it was not compared pixel by
  pixel with files made by the Detail API.

    python datasets/prepare_pascal_context.py [--root DIR] [--splits val]
"""
import os
import shutil

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from psalm.data.class_names import load_categories
from psalm.data.datasets.prepare_utils import prepare_parser, require_input, setup_logging

DIRS = {"train": "training", "val": "validation"}
ALIASES_459 = {"diningtable": "table"}


def pc59_lookup() -> np.ndarray:
    """uint8 [460] table: full label (0..459) -> PC-59 contiguous id, 255 elsewhere."""
    names459 = [c["raw_name"] for c in load_categories("pascal_ctx_459")]
    table = np.full(460, 255, dtype=np.uint8)
    for i, c in enumerate(load_categories("pascal_ctx_59")):
        table[names459.index(ALIASES_459.get(c["raw_name"], c["raw_name"])) + 1] = i
    return table


def convert_459(label_map: np.ndarray) -> np.ndarray:
    out = label_map.astype(np.int64) - 1
    out[label_map == 0] = 65535
    return out.astype(np.uint16)


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--splits", nargs="+", default=["val"], choices=list(DIRS))
    parser.add_argument("--list-dir", default=None, help="folder with <split>.txt (default VOC2010/ImageSets/Main)")
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    voc = os.path.join(args.root, "VOCdevkit", "VOC2010")
    mat_dir = require_input(os.path.join(voc, "trainval"), "Pascal-Context trainval.tar.gz (the .mat labels)",
                            is_dir=True)
    table = pc59_lookup()
    for split in args.splits:
        list_file = require_input(os.path.join(args.list_dir or os.path.join(voc, "ImageSets", "Main"), f"{split}.txt"),
                                  "VOCtrainval_03-May-2010.tar")
        with open(list_file) as f:
            names = [x.strip() for x in f if x.strip()]
        base = os.path.join(args.root, "pascal_ctx_d2")
        outs = {k: os.path.join(base, k, DIRS[split]) for k in ("images", "annotations_ctx459", "annotations_ctx59")}
        for d in outs.values():
            os.makedirs(d, exist_ok=True)
        for n in tqdm(names, desc=split):
            label = scipy.io.loadmat(os.path.join(mat_dir, n + ".mat"))["LabelMap"]
            if label.max() > 459:
                raise ValueError(f"{n}.mat has label {label.max()} > 459")
            Image.fromarray(convert_459(label)).save(os.path.join(outs["annotations_ctx459"], n + ".tif"))
            Image.fromarray(table[label]).save(os.path.join(outs["annotations_ctx59"], n + ".png"))
            shutil.copy2(os.path.join(voc, "JPEGImages", n + ".jpg"), os.path.join(outs["images"], n + ".jpg"))
        log.info("%s: %d images -> %s", split, len(names), base)


if __name__ == "__main__":
    main()
