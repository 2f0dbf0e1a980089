#!/usr/bin/env python
"""LVIS v1: ``lvis/lvis_v1_{train,val}.json`` -> ``lvis/lvis_v1_{train,val}_psalm.json`` (one file per split).

Image ``file_name`` becomes ``train2017/<id>.jpg`` or ``val2017/<id>.jpg`` parsed from ``coco_url``
(LVIS v1 val also uses COCO train2017 images), relative to ``coco/``; annotations get
``iscrowd=0``. The official ``bulid_lvis.py`` wrote both splits to the same file (spec 7.2).

    python datasets/prepare_lvis.py [--root DIR] [--splits train val]
"""
import os
from urllib.parse import urlparse

from tqdm import tqdm

from psalm.data.datasets.lvis import lvis_json_path
from psalm.data.datasets.prepare_utils import prepare_parser, read_json, setup_logging, write_json


def image_file_from_url(url: str) -> str:
    """``http://images.cocodataset.org/train2017/000000391895.jpg`` -> ``train2017/000000391895.jpg``."""
    parts = urlparse(url).path.strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"cannot parse an image path from coco_url {url!r}")
    return "/".join(parts[-2:])


def convert(lvis: dict, split: str) -> dict:
    images = []
    for img in tqdm(lvis["images"], desc=f"lvis {split}", leave=False):
        d = {k: img[k] for k in ("id", "height", "width")}
        d["file_name"] = image_file_from_url(img["coco_url"])
        for k in ("not_exhaustive_category_ids", "neg_category_ids"):
            if k in img:
                d[k] = img[k]
        images.append(d)
    anns = [dict(a, iscrowd=int(a.get("iscrowd", 0))) for a in lvis["annotations"]]
    return {"info": {"source": f"lvis_v1_{split}.json"}, "images": images, "annotations": anns,
            "categories": lvis["categories"]}


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    for split in args.splits:
        src = os.path.join(args.root, "lvis", f"lvis_v1_{split}.json")
        doc = convert(read_json(src, f"LVIS v1 {split} annotations (lvis_v1_{split}.json.zip)"), split)
        write_json(lvis_json_path(args.root, split), doc, log)
        log.info("lvis %s: %d images, %d annotations", split, len(doc["images"]), len(doc["annotations"]))


if __name__ == "__main__":
    main()
