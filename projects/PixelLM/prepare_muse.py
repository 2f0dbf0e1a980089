#!/usr/bin/env python
"""Check the released MUSE JSON files and place them where ``pixellm_muse_*`` reads them.

    python projects/PixelLM/prepare_muse.py --src path/to/muse_jsons --images path/to/coco \\
        --out datasets/muse

Reads ``muse_{train,val,test_less,test_many}.json`` (or the Pixel-SAIL names ``MUSE_*.json``),
validates every record (questions / answers / ``{seg}`` counts), reports the questions the loader
drops (official rule: a ``text_answers`` entry whose ``{seg}`` count differs from its targets), and
writes ``<out>/muse_<split>.json`` plus a link ``<out>/images`` -> ``--images`` (COCO images: the
``file_name`` records under it, the ``coco_url`` ones under ``train2017`` / ``val2017``).
"""
import argparse
import json
import logging
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SPLITS = ("train", "val", "test_less", "test_many")


def prepare(src, images, out) -> dict:
    from pixellm.data.muse import muse_records_to_dicts

    src, out = pathlib.Path(src), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for split in SPLITS:
        cands = [src / f"muse_{split}.json", src / f"MUSE_{split}.json"]
        path = next((c for c in cands if c.is_file()), None)
        if path is None:
            logging.warning("MUSE %s: none of %s found", split, [c.name for c in cands])
            continue
        records = json.loads(path.read_text())
        dicts, dropped = muse_records_to_dicts(records, str(images))
        report[split] = {"images": len(dicts), "questions": sum(len(d["questions"]) for d in dicts),
                         "targets": sum(len(t) for d in dicts for t in d["targets"]), "dropped_questions": dropped}
        (out / f"muse_{split}.json").write_text(json.dumps(records))
        logging.info("MUSE %s: %s", split, report[split])
    link = out / "images"
    if not link.exists():
        link.symlink_to(pathlib.Path(images).resolve())
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", default="datasets/muse")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    prepare(args.src, args.images, args.out)


if __name__ == "__main__":
    main()
