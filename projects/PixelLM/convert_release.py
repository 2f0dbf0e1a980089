#!/usr/bin/env python
"""Convert a released PixelLM ``hf_model`` directory (+ the HF CLIP directory) into one model directory.

    python projects/PixelLM/convert_release.py --release PixelLM-7B/hf_model \\
        --clip clip-vit-large-patch14-336 --output models/pixellm-7b

Strict: every missing, unexpected or mis-shaped key is reported and the conversion fails.
``--fixed-position-embedding`` interpolates CLIP's position table with CLS at row 0 (the intended
behaviour; the released weights were trained with the official off-by-one, the default).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None):
    from pixellm.checkpoint import convert_release

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", required=True, help="the release's hf_model directory")
    ap.add_argument("--clip", required=True, help="HF CLIP (vision) directory, openai/clip-vit-large-patch14-336")
    ap.add_argument("--output", required=True)
    ap.add_argument("--decoder-num-heads", type=int, default=8, help="8 in the release (hard-coded officially)")
    ap.add_argument("--fixed-position-embedding", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    conv = convert_release(args.release, args.clip, args.output, decoder_num_heads=args.decoder_num_heads,
                           compat_position_embedding=not args.fixed_position_embedding)
    logging.info("wrote %s: %d tensors, %d dropped by rule", args.output, len(conv.state_dict), len(conv.dropped))


if __name__ == "__main__":
    main()
