#!/usr/bin/env python
"""Convert an authors' Pixel-SAIL training checkpoint (xtuner .pth, spec B4) to a psalm checkpoint.

    python projects/PixelSAIL/convert_official.py --config-file <pixel-sail config> --checkpoint iter_XXX.pth \\
        --output out/  [KEY VALUE ...]

The config must describe the checkpoint's model (LLM dimensions, PATCH_SIZE, SEG_HIDDEN_DIM, tokenizer
with the official tokens); every key is checked strictly against it before anything is written. Writes
``out/model_final.pth`` (``{"model": state_dict}``, loadable with MODEL.WEIGHTS) and ``out/config.yaml``.
"""
import argparse
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402


def main(argv=None):
    from pixel_sail import PixelSAIL, get_pixel_sail_cfg
    from pixel_sail.converter import load_official_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("opts", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = get_pixel_sail_cfg(args.config_file, args.opts)
    cfg.MODEL.PIXEL_SAIL.LLM.INIT = "random"  # every weight comes from the checkpoint
    cfg.MODEL.PIXEL_SAIL.DISTILL.M2F_TEACHER = cfg.MODEL.PIXEL_SAIL.DISTILL.SAM2_TEACHER = ""
    model = PixelSAIL(cfg)
    conv = load_official_checkpoint(model, args.checkpoint)
    os.makedirs(args.output, exist_ok=True)
    torch.save({"model": model.state_dict()}, os.path.join(args.output, "model_final.pth"))
    cfg.MODEL.WEIGHTS = os.path.join(args.output, "model_final.pth")
    with open(os.path.join(args.output, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    print(conv.format())
    return conv


if __name__ == "__main__":
    main()
