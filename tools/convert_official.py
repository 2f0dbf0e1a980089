#!/usr/bin/env python
"""Convert the official PSALM release (HF-style directory) into a psalm checkpoint.

    python tools/convert_official.py --release /path/to/PSALM --output checkpoints/psalm \\
        [--config-file configs/coco/psalm_swin_base_phi15.yaml] [KEY VALUE ...]

Writes ``<output>/model_final.pth`` (``{"model": state_dict}``, loadable with detectron2's
``DetectionCheckpointer``), ``<output>/config.yaml`` (the config with ``MODEL.WEIGHTS`` and
``MODEL.PSALM.TOKENIZER`` pointing at the output) and the tokenizer files. Nothing is written when
the converted weights do not match the model described by the config: the error lists every
missing, unexpected and mis-shaped key.
"""

import argparse
import logging
import sys

from psalm.checkpoint.official import convert_official_release
from psalm.config import get_psalm_cfg

DEFAULT_CONFIG = "configs/coco/psalm_swin_base_phi15.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--release", required=True, help="official release directory (config.json, safetensors, tokenizer)"
    )
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help=f"psalm config (default {DEFAULT_CONFIG})")
    parser.add_argument("--checkpoint-name", default="model_final.pth")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = get_psalm_cfg(args.config_file, args.opts)
    result = convert_official_release(args.release, args.output, cfg, checkpoint_name=args.checkpoint_name)
    logging.getLogger("convert_official").info(
        "wrote %s (%d dropped keys) and %s", result.checkpoint, len(result.dropped), result.config
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
