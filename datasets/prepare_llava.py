#!/usr/bin/env python
"""LLaVA JSON -> our filtered file: readable images only, ``<image>`` at the start of the first human turn.

Instruction (stage 2): ``llava_v1_5_mix665k.json`` with images under ``llava/images/`` (coco/,
gqa/, ocr_vqa/, textvqa/, vg/). Captions (stage 1): LLaVA-Pretrain ``blip_laion_cc_sbu_558k.json``
(images ``llava/pretrain_images/``) or LLaVA-CC3M-Pretrain-595K ``chat.json`` (``llava/cc3m_images/``).

A sample is kept when it has an ``image`` that exists and opens (``--verify`` also decodes it);
text-only samples are dropped (as the official ``onlyMM`` file). Every ``<image>`` in the human
turns is removed and one ``<image>\\n`` is put at the start of the first human turn. Output:
``{"info": ..., "samples": [{"id", "image", "height", "width", "conversations"}]}``.

    python datasets/prepare_llava.py --kind instruction [--input FILE] [--output FILE] [--workers 4]
"""
import functools
import os

from PIL import Image

from psalm.data.datasets.prepare_utils import (
    map_items,
    prepare_parser,
    read_json,
    require_input,
    setup_logging,
    write_json,
)

IMAGE_TOKEN = "<image>"
DEFAULTS = {  # kind -> (input, image folder, output), relative to <root>/llava
    "instruction": ("llava_v1_5_mix665k.json", "images", "llava_v1_5_mix665k_psalm.json"),
    "pretrain": ("blip_laion_cc_sbu_558k.json", "pretrain_images", "llava_pretrain_558k_psalm.json"),
    "cc3m": ("chat.json", "cc3m_images", "llava_cc3m_595k_psalm.json"),
}


def move_image_token(conversations: list) -> list:
    """Copy of the turns with ``<image>`` removed from human turns and put first in the first one."""
    out, placed = [], False
    for turn in conversations:
        turn = dict(turn)
        if turn["from"] == "human":
            text = turn["value"].replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "")
            text = text.replace(IMAGE_TOKEN, "").strip()
            if not placed:
                text = f"{IMAGE_TOKEN}\n{text}"
                placed = True
            turn["value"] = text
        out.append(turn)
    if not placed:
        raise ValueError("conversation has no human turn")
    return out


def check_sample(sample: dict, image_root: str, verify: bool):
    """(kept record or None, reason)."""
    if not sample.get("image"):
        return None, "no image"
    path = os.path.join(image_root, sample["image"])
    if not os.path.isfile(path):
        return None, "missing"
    try:
        with Image.open(path) as im:
            width, height = im.size
            if verify:
                im.load()
    except (OSError, SyntaxError, ValueError):
        return None, "unreadable"
    rec = {"id": sample.get("id", sample["image"]), "image": sample["image"], "height": height, "width": width,
           "conversations": move_image_token(sample["conversations"])}
    return rec, "kept"


def main(argv=None):
    parser = prepare_parser(__doc__.splitlines()[1])
    parser.add_argument("--kind", choices=list(DEFAULTS), required=True)
    parser.add_argument("--input", default=None)
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--verify", action="store_true", help="fully decode every image (slow)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    log = setup_logging(args.log_level)
    base = os.path.join(args.root, "llava")
    inp, img, outp = DEFAULTS[args.kind]
    src = args.input or os.path.join(base, inp)
    image_root = require_input(args.image_root or os.path.join(base, img), "the LLaVA images", is_dir=True)
    samples = read_json(src, f"LLaVA {args.kind} JSON")
    work = functools.partial(check_sample, image_root=image_root, verify=args.verify)
    results = map_items(work, samples, args.workers, desc="images", chunksize=64)
    kept = [r for r, _ in results if r is not None]
    reasons = {}
    for _, why in results:
        reasons[why] = reasons.get(why, 0) + 1
    ids = [r["id"] for r in kept]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{src!r}: sample ids are not unique")
    doc = {"info": {"source": os.path.basename(src), "kind": args.kind, "counts": reasons}, "samples": kept}
    write_json(args.output or os.path.join(base, outp), doc, log)
    log.info("kept %d of %d samples (%s)", len(kept), len(samples), reasons)


if __name__ == "__main__":
    main()
