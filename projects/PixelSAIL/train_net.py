#!/usr/bin/env python
"""Train and/or evaluate Pixel-SAIL (detectron2 conventions; follows psalm's tools/train_net.py).

Examples::

    # the tiny synthetic job (CPU): referring + gres + visual-prompt category classification
    python projects/PixelSAIL/train_net.py --config-file projects/PixelSAIL/configs/tiny/pixelsail_synthetic.yaml

    # evaluation only
    python projects/PixelSAIL/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth

    # 8 GPUs, resume
    python projects/PixelSAIL/train_net.py --config-file ... --num-gpus 8 --resume
"""
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from detectron2.engine import default_setup  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from psalm.engine.defaults import default_argument_parser, train_or_evaluate  # noqa: E402
from psalm.engine import launch, resolve_device  # noqa: E402

from pixel_sail import get_pixel_sail_cfg  # noqa: E402
from pixel_sail.engine import PixelSAILTrainer  # noqa: E402

logger = logging.getLogger("pixel_sail.train_net")


def setup(args):
    """Config (file + opts), logging, seeding, config backup, data-set registration (synthetic data and
    its tokenizer are generated on first use)."""
    import psalm.data.datasets  # noqa: F401  (registers every psalm data set)
    from psalm.data import synthetic as syn
    from psalm.data.datasets.synthetic import prepare_synthetic_for_cfg

    cfg = get_pixel_sail_cfg(args.config_file, args.opts)
    resolve_device(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="psalm")
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pixel_sail")
    if prepare_synthetic_for_cfg(cfg) is not None:
        tok = cfg.MODEL.PIXEL_SAIL.TOKENIZER
        if tok and not os.path.isfile(os.path.join(tok, "tokenizer_config.json")) and comm.is_main_process():
            syn.save_synthetic_tokenizer(tok)
        comm.synchronize()
    return cfg


def main(args):
    return train_or_evaluate(PixelSAILTrainer, setup(args), args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
