#!/usr/bin/env python
"""Pixel-SAIL demo: answer text + masks (and the visual prompts) drawn on the image.

    python projects/PixelSAIL/demo.py --config-file <config> --input img.jpg --text "the red circle" \\
        --output out.png MODEL.WEIGHTS model_final.pth
    python projects/PixelSAIL/demo.py ... --question "What is the category of the region marked by <Prompt0>?" \\
        --box 10 10 60 60
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def draw(image, result, alpha=0.5):
    """uint8 RGB [H, W, 3]: the predicted masks labelled with the answer, or (no mask) the visual prompts and
    the answer as a banner (psalm's visualizer)."""
    import torch
    from detectron2.structures import Instances

    from psalm.utils.prompts import rasterize_regions
    from psalm.utils.visualizer import draw_prediction

    if len(result["masks"]):
        inst = Instances(image.shape[:2])
        inst.pred_masks = torch.as_tensor(result["masks"])
        inst.scores = torch.as_tensor(result["scores"])
        return draw_prediction(image, {"instances": inst}, "referring", sentence=result["text"], alpha=alpha)
    if result["regions"]:
        inst = Instances(image.shape[:2])
        inst.pred_masks = torch.as_tensor(rasterize_regions(result["regions"], image.shape[:2]))
        inst.scores = torch.ones(len(inst.pred_masks))
        image = draw_prediction(image, {"instances": inst}, "interactive", regions=result["regions"], alpha=alpha)
    return draw_prediction(image, {"text": result["text"] or "(empty answer)"}, "instruction")


def main(argv=None):
    from PIL import Image

    from pixel_sail import get_pixel_sail_cfg
    from pixel_sail.predictor import PixelSAILPredictor
    from psalm.utils.image_io import load_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--text")
    ap.add_argument("--question")
    ap.add_argument("--task")
    ap.add_argument("--point", nargs=2, type=float, action="append")
    ap.add_argument("--box", nargs=4, type=float, action="append")
    ap.add_argument("--allow-random-weights", action="store_true", help="smoke runs without weights")
    ap.add_argument("opts", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cfg = get_pixel_sail_cfg(args.config_file, args.opts)
    predictor = PixelSAILPredictor(cfg, allow_random_weights=args.allow_random_weights)
    result = predictor(args.input, text=args.text, question=args.question, task=args.task,
                       points=[tuple(p) for p in args.point] if args.point else None,
                       boxes=[tuple(b) for b in args.box] if args.box else None)
    Image.fromarray(draw(load_image(args.input), result)).save(args.output)
    print(result["text"])
    return result


if __name__ == "__main__":
    main()
