#!/usr/bin/env python
"""PixelLM demo: answer a question about an image and draw one mask per target with its phrase.

    python projects/PixelLM/demo.py --model-dir models/pixellm-7b --image cat.jpg \\
        --question "What are the animals in this image?" --output out.png [--opts MODEL.DEVICE cuda]
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None):
    from PIL import Image

    from pixellm.predictor import PixelLMPredictor, draw_answer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    predictor = PixelLMPredictor.from_model_dir(args.model_dir, args.opts)
    pred = predictor(args.image, args.question, max_new_tokens=args.max_new_tokens)
    logging.info("answer: %s", pred["text"])
    Image.fromarray(draw_answer(args.image, pred)).save(args.output)
    return pred


if __name__ == "__main__":
    main()
