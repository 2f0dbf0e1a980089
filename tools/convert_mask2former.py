#!/usr/bin/env python
"""Convert a Mask2Former detectron2 ``.pkl`` (Swin backbone) into psalm names for stage-2 initialisation.

    python tools/convert_mask2former.py --input model_final_54b88a.pkl --output checkpoints/m2f_swin_b.pth \\
        [--config-file configs/coco/psalm_swin_base_phi15.yaml] [--num-queries 100] [--drop PATTERN ...] [KEY VALUE ...]

Writes ``{"model": state_dict, "dropped": {key: reason}, "allowed_missing": [keys]}`` with keys
``backbone.*``, ``pixel_decoder.*``, ``predictor.*``. Before writing, the converted weights are
loaded strictly into the backbone, pixel decoder and decoder built from the config; nothing is
written when they do not match (the error lists every missing, unexpected and mis-shaped key).
``--num-queries`` keeps the first N rows of a larger ``query_embed`` (e.g. 200-query instance models).
"""

import argparse
import logging
import sys

import torch
from detectron2.modeling import build_backbone
from torch import nn

from psalm.checkpoint.mask2former import convert_mask2former_checkpoint, load_mask2former_into
from psalm.config import get_psalm_cfg
from psalm.modeling import build_pixel_decoder, build_transformer_decoder

DEFAULT_CONFIG = "configs/coco/psalm_swin_base_phi15.yaml"
logger = logging.getLogger("convert_mask2former")


def build_vision_modules(cfg) -> nn.Module:
    """A container with the ``backbone``, ``pixel_decoder`` and ``predictor`` described by ``cfg``."""
    container = nn.Module()
    container.backbone = build_backbone(cfg)
    container.pixel_decoder = build_pixel_decoder(cfg, container.backbone.output_shape())
    container.predictor = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
    return container


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="Mask2Former detectron2 checkpoint (.pkl)")
    parser.add_argument("--output", required=True, help="output file (.pth)")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help=f"psalm config (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--num-queries",
        type=int,
        default=None,
        help="truncate query_embed to this many rows (default: keep; must then match the config)",
    )
    parser.add_argument("--drop", action="append", default=[], help="extra key pattern to drop on purpose (repeatable)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = get_psalm_cfg(args.config_file, args.opts)
    conversion = convert_mask2former_checkpoint(args.input, num_queries=args.num_queries, drop=args.drop)
    load_mask2former_into(build_vision_modules(cfg), conversion)  # raises with the full report on mismatch
    torch.save(
        {"model": conversion.state_dict, "dropped": conversion.dropped, "allowed_missing": conversion.allowed_missing},
        args.output,
    )
    logger.info("wrote %s: %s", args.output, conversion.format().splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
