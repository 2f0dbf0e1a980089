#!/usr/bin/env python
"""Train and/or evaluate PSALM (detectron2 conventions).

Examples::

    # the README main job: the built-in synthetic data, CPU, trains then evaluates
    python tools/train_net.py --config-file configs/tiny/psalm_synthetic.yaml

    # 8 GPUs on one machine; resume after an interruption
    python tools/train_net.py --config-file configs/coco/psalm_swin_base_phi15.yaml --num-gpus 8 --resume

    # stage 2 of the paper from the upstream files (docs/TRAINING.md "Initial weights": MODEL.PSALM.INIT.WEIGHTS)
    python tools/train_net.py --config-file configs/coco/psalm_swin_base_phi15.yaml --num-gpus 8

    # evaluation only (every DATASETS.TEST entry with its DATASETS.TEST_TASKS task; the evaluation path of
    # tools/eval_zero_shot.py: TEST.PSALM.DTYPE, TEST.PSALM.IMS_PER_BATCH)
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/tiny_synthetic   # a model directory

    # 2 CPU processes (gloo), or several machines, or torchrun
    python tools/train_net.py --config-file ... --num-gpus 2
    python tools/train_net.py --config-file ... --num-gpus 8 --num-machines 2 --machine-rank 0 --dist-url tcp://host:port
    torchrun --nproc-per-node 8 tools/train_net.py --config-file ...

A run that does not resume starts from ``MODEL.PSALM.INIT.WEIGHTS`` (+ ``MODEL.WEIGHTS``), every model key
from exactly one source; a frozen part left random is an error unless ``MODEL.PSALM.INIT.FROM_SCRATCH``.
``--eval-only`` refuses an empty ``MODEL.WEIGHTS`` or a checkpoint that leaves model tensors missing unless
``--allow-missing-keys`` (as ``tools/eval_zero_shot.py``). ``MODEL.DEVICE cuda`` without CUDA is an error.

``--num-gpus`` is the number of processes per machine; without CUDA they are CPU processes with the
gloo backend. Under ``torchrun`` the process group comes from the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``) and ``--num-gpus`` / ``--num-machines`` are ignored.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_setup  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from psalm.config import get_psalm_cfg  # noqa: E402
from psalm.engine import PSALMTrainer, launch, resolve_device  # noqa: E402
from psalm.engine.defaults import default_argument_parser, train_or_evaluate  # noqa: E402
from psalm.model_dir import apply_model_dir_weights, save_tokenizer_to  # noqa: E402

logger = logging.getLogger("psalm.tools.train_net")


def setup(args):
    """Config (file + opts), logging, seeding, config backup, data-set registration."""
    import psalm.data.datasets  # noqa: F401  (registers every psalm data set)
    from psalm.data.datasets.synthetic import prepare_synthetic_for_cfg

    cfg = get_psalm_cfg(args.config_file, args.opts)
    apply_model_dir_weights(cfg)  # MODEL.WEIGHTS may name a model directory (its model_final.pth + tokenizer)
    resolve_device(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="psalm")
    # generates the built-in synthetic data (and its tokenizer) on first use; a file lock makes
    # concurrent ranks wait for the first one
    prepare_synthetic_for_cfg(cfg)
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        # with default_setup's config.yaml and the trainer's model_final.pth: OUTPUT_DIR is a model directory
        save_tokenizer_to(cfg, cfg.OUTPUT_DIR)
    return cfg


def main(args):
    return train_or_evaluate(PSALMTrainer, setup(args), args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
