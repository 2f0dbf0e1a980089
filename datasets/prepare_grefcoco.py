#!/usr/bin/env python
"""gRefCOCO: grefs(unc).json + instances.json -> our JSON per split (train / val / testA / testB).

``grefs(unc).json`` is read as JSON (the official builder opened it with ``pickle``, spec 7.2).
A ref whose ``ann_id`` is ``[-1]`` (or contains -1 only) has no target: its ``ann_ids`` become
``[]`` and the loader marks its samples ``no_target``. Output:
``refer_seg/grefcoco/grefcoco_<split>.json``, the RefCOCO format of prepare_refcoco.py.

    python datasets/prepare_grefcoco.py [--root DIR]
"""
import os

from psalm.data.datasets.grefcoco import GREFCOCO_SPLITS, grefcoco_json_path
from psalm.data.datasets.prepare_utils import prepare_parser, read_json, setup_logging, write_json

from prepare_refcoco import build_split_files  # noqa: E402  (same folder)


def normalise_grefs(grefs: list) -> list:
    """ann_id lists without the -1 no-target marker (a list is kept a list, an int becomes [int])."""
    out = []
    for r in grefs:
        ids = r["ann_id"] if isinstance(r["ann_id"], list) else [r["ann_id"]]
        ids = [int(a) for a in ids if int(a) != -1]
        out.append(dict(r, ann_id=ids))
    return out


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    base = os.path.join(args.root, "refer_seg", "grefcoco")
    grefs = read_json(os.path.join(base, "grefs(unc).json"), "gRefCOCO release (grefs(unc).json)")
    instances = read_json(os.path.join(base, "instances.json"), "gRefCOCO release (instances.json)")
    docs = build_split_files(normalise_grefs(grefs), instances, "grefcoco", "unc", GREFCOCO_SPLITS,
                             "grefs(unc).json + instances.json")
    for split, doc in docs.items():
        write_json(grefcoco_json_path(args.root, split), doc, log)
        n_nt = sum(1 for r in doc["refs"] if not r["ann_ids"])
        log.info("grefcoco %s: %d refs (%d no-target)", split, len(doc["refs"]), n_nt)


if __name__ == "__main__":
    main()
