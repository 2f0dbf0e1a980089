#!/usr/bin/env python
"""DAVIS-2017 val -> ``DAVIS/davis17_val_psalm.json`` (frames, object ids per frame, frame-0 RLEs).

Input: the DAVIS-2017 trainval 480p tree under ``DAVIS/``: ``JPEGImages/480p/<video>/<frame>.jpg``,
``Annotations/480p/<video>/<frame>.png`` (palette PNG: 0 background, k object k, 255 void) and
``ImageSets/2017/val.txt``. Every frame must have its annotation PNG (DAVIS val has them all).

    python datasets/prepare_davis.py [--root DIR] [--split val]
"""
import glob
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from psalm.data.datasets.davis import davis_json_path
from psalm.data.datasets.prepare_utils import prepare_parser, require_input, setup_logging, write_json
from psalm.data.visual_prompts import encode_rle


def object_ids(label: np.ndarray) -> list:
    return [int(v) for v in np.unique(label) if v not in (0, 255)]


def build_video(davis_root: str, name: str) -> dict:
    img_dir = require_input(os.path.join(davis_root, "JPEGImages", "480p", name), f"frames of video {name}", is_dir=True)
    frames = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(img_dir, "*.jpg")))
    if not frames:
        raise FileNotFoundError(f"no frames in {img_dir!r}")
    per_frame, first = [], None
    for f in frames:
        png = require_input(os.path.join(davis_root, "Annotations", "480p", name, f + ".png"),
                            f"DAVIS annotation of {name}/{f}")
        label = np.asarray(Image.open(png))
        if first is None:
            first = label
        per_frame.append(object_ids(label))
    h, w = first.shape
    objs = []
    for oid in object_ids(first):
        m = first == oid
        ys, xs = np.nonzero(m)
        objs.append({"object_id": oid, "segmentation": encode_rle(m), "area": int(m.sum()),
                     "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]})
    if not objs:
        raise ValueError(f"video {name}: the first frame has no object")
    return {"name": name, "height": int(h), "width": int(w), "frames": frames, "first_frame_objects": objs,
            "objects_per_frame": per_frame}


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--split", default="val")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    davis_root = os.path.join(args.root, "DAVIS")
    list_file = require_input(os.path.join(davis_root, "ImageSets", "2017", f"{args.split}.txt"),
                              "DAVIS-2017 trainval (DAVIS-2017-trainval-480p.zip)")
    with open(list_file) as f:
        names = [line.strip() for line in f if line.strip()]
    videos = [build_video(davis_root, n) for n in tqdm(names, desc="videos")]
    out = args.output or davis_json_path(args.root)
    write_json(out, {"info": {"split": args.split, "source": "DAVIS-2017 480p"}, "videos": videos}, log)
    log.info("%d videos, %d frames, %d objects", len(videos), sum(len(v["frames"]) for v in videos),
             sum(len(v["first_frame_objects"]) for v in videos))


if __name__ == "__main__":
    main()
