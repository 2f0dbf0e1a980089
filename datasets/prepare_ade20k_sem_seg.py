#!/usr/bin/env python
"""ADE20K-150 semantic labels -> detectron2 layout: ``annotations_detectron2/{training,validation}``.

Input ``ADEChallengeData2016/annotations/<split>/*.png`` (0 = other, 1..150 = classes); output the
same file names with 0 -> 255 (ignore) and k -> k - 1 (the standard detectron2 / Mask2Former layout).

    python datasets/prepare_ade20k_sem_seg.py [--root DIR]
"""
import glob
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from psalm.data.datasets.prepare_utils import prepare_parser, require_input, setup_logging


def convert_label(label: np.ndarray) -> np.ndarray:
    out = label.astype(np.int32) - 1
    out[label == 0] = 255
    return out.astype(np.uint8)


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    base = os.path.join(args.root, "ADEChallengeData2016")
    for split in ("training", "validation"):
        src = require_input(os.path.join(base, "annotations", split), "ADEChallengeData2016.zip (SceneParsing)",
                            is_dir=True)
        dst = os.path.join(base, "annotations_detectron2", split)
        os.makedirs(dst, exist_ok=True)
        files = sorted(glob.glob(os.path.join(src, "*.png")))
        for f in tqdm(files, desc=split):
            Image.fromarray(convert_label(np.asarray(Image.open(f)))).save(os.path.join(dst, os.path.basename(f)))
        log.info("%s: %d labels -> %s", split, len(files), dst)


if __name__ == "__main__":
    main()
