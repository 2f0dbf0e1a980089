#!/usr/bin/env python
"""Train and/or evaluate PixelLM on the psalm engine (the structure of ``tools/train_net.py``).

Examples::

    # the tiny synthetic run (CPU)
    python projects/PixelLM/train_net.py --config-file projects/PixelLM/configs/pixellm_tiny.yaml

    # fine-tune the converted release on MUSE, 8 GPUs
    python projects/PixelLM/train_net.py --config-file projects/PixelLM/configs/Base-PixelLM.yaml --num-gpus 8 \\
        MODEL.PIXELLM.MODEL_DIR models/pixellm-7b

    # evaluation only: the converted release (weights from MODEL_DIR) or a trained checkpoint (MODEL.WEIGHTS)
    python projects/PixelLM/train_net.py --config-file ... --eval-only MODEL.PIXELLM.MODEL_DIR models/pixellm-7b \\
        DATASETS.TEST '("pixellm_muse_val",)'
"""
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

from detectron2.engine import default_setup  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from psalm.engine.defaults import default_argument_parser, train_or_evaluate  # noqa: E402
from psalm.engine import launch, resolve_device  # noqa: E402

from pixellm import get_pixellm_cfg  # noqa: E402
from pixellm.engine import PixelLMTrainer, prepare_pixellm_data_for_cfg  # noqa: E402

logger = logging.getLogger("pixellm.train_net")


def setup(args):
    cfg = get_pixellm_cfg(args.config_file, args.opts)
    resolve_device(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pixellm")
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="psalm")
    prepare_pixellm_data_for_cfg(cfg)
    return cfg


def main(args):
    return train_or_evaluate(PixelLMTrainer, setup(args), args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
