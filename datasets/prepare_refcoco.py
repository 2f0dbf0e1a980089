#!/usr/bin/env python
"""RefCOCO / RefCOCO+ / RefCOCOg: refs(unc).p / refs(umd).p + instances.json -> our JSON per split.

Inputs (the ``refer`` package layout): ``refer_seg/<dataset>/refs(<splitBy>).p`` (a pickle) and
``refer_seg/<dataset>/instances.json`` (COCO train2014 images / annotations of that data set).
RefCOCO and RefCOCO+ use ``unc`` (train/val/testA/testB), RefCOCOg ``umd`` (train/val/test).

Output ``refer_seg/<dataset>/<dataset>_<splitBy>_<split>.json``: ``images``, ``annotations``
(only those referred to), ``categories`` and ``refs`` [{``ref_id``, ``image_id``, ``ann_ids``,
``category_id``, ``sentences``: [{``sent_id``, ``sent``, ``raw``}]}]. Both evaluation protocols
(per sentence / per ref) are built from it at load time (psalm/data/datasets/refcoco.py).

    python datasets/prepare_refcoco.py [--root DIR] [--datasets refcoco refcoco+ refcocog]
"""
import os
import pickle
from collections import defaultdict

from tqdm import tqdm

from psalm.data.datasets.prepare_utils import prepare_parser, read_json, require_input, setup_logging, write_json
from psalm.data.datasets.refcoco import REFCOCO_SPLITS, referring_json_path

SPLIT_BY = {d: s for (d, s) in REFCOCO_SPLITS}


def build_split_files(refs: list, instances: dict, dataset: str, split_by: str, splits, source: str) -> dict:
    """refs (already parsed) + instances.json -> {split: our JSON document}."""
    images = {img["id"]: img for img in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    by_split = defaultdict(list)
    for r in refs:
        by_split[r["split"]].append(r)
    unknown = set(by_split) - set(splits)
    if unknown:
        raise ValueError(f"{dataset} refs({split_by}) has splits {sorted(unknown)}, expected {list(splits)}")
    out = {}
    for split in splits:
        used_imgs, used_anns, refs_out = {}, {}, []
        for r in tqdm(by_split.get(split, []), desc=f"{dataset} {split}", leave=False):
            ann_ids = r["ann_id"] if isinstance(r["ann_id"], list) else [r["ann_id"]]
            for a in ann_ids:
                if a not in anns:
                    raise KeyError(f"{dataset}: ref {r['ref_id']} points to annotation {a}, missing in instances.json")
                used_anns[a] = anns[a]
            used_imgs[r["image_id"]] = images[r["image_id"]]
            refs_out.append(
                {
                    "ref_id": r["ref_id"],
                    "image_id": r["image_id"],
                    "ann_ids": list(ann_ids),
                    "category_id": r.get("category_id"),
                    "sentences": [{"sent_id": s["sent_id"], "sent": s["sent"], "raw": s.get("raw", s["sent"])}
                                  for s in r["sentences"]],
                }
            )
        out[split] = {
            "info": {"dataset": dataset, "split_by": split_by, "split": split, "source": source},
            "images": [{k: img[k] for k in ("id", "file_name", "height", "width")} for img in used_imgs.values()],
            "annotations": [
                {k: a[k] for k in ("id", "image_id", "category_id", "segmentation", "bbox", "area", "iscrowd") if k in a}
                for a in used_anns.values()
            ],
            "categories": instances.get("categories", []),
            "refs": refs_out,
        }
    return out


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--datasets", nargs="+", default=["refcoco", "refcoco+", "refcocog"], choices=list(SPLIT_BY))
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    for dataset in args.datasets:
        split_by = SPLIT_BY[dataset]
        base = os.path.join(args.root, "refer_seg", dataset)
        refs_file = require_input(os.path.join(base, f"refs({split_by}).p"),
                                  f"the {dataset} refs pickle from the 'refer' data release")
        with open(refs_file, "rb") as f:
            refs = pickle.load(f)
        instances = read_json(os.path.join(base, "instances.json"), f"the {dataset} instances.json of the 'refer' release")
        docs = build_split_files(refs, instances, dataset, split_by, REFCOCO_SPLITS[(dataset, split_by)],
                                 f"refs({split_by}).p + instances.json")
        for split, doc in docs.items():
            write_json(referring_json_path(args.root, dataset, split_by, split), doc, log)
            log.info("%s %s: %d refs, %d sentences", dataset, split, len(doc["refs"]),
                     sum(len(r["sentences"]) for r in doc["refs"]))


if __name__ == "__main__":
    main()
