#!/usr/bin/env python
"""Zero-shot evaluation of PSALM (paper Tables 11-13): open-vocabulary semantic / instance /
panoptic segmentation, generalized referring (gRefCOCO) and video object segmentation (DAVIS-17).

    python tools/eval_zero_shot.py --config-file configs/coco/psalm_swin_base_phi15.yaml \\
        --task ov_semantic --dataset ade20k_sem_seg_val_psalm [--output DIR] \\
        MODEL.WEIGHTS psalm.pth [KEY VALUE ...]

Tasks (the data set's ``evaluator_type`` must match; registered names: datasets/README.md):

============  ==============  ============================================  ===============================
--task        model task      evaluator types                               e.g. --dataset
============  ==============  ============================================  ===============================
ov_semantic   semantic        sem_seg (mIoU)                                ade20k_sem_seg_val_psalm,
                                                                            pascal_ctx_{59,459}_sem_seg_val_psalm,
                                                                            pascal_voc_20_sem_seg_val_psalm
ov_instance   instance        coco (mask AP), lvis                          ade20k_instance_val_psalm,
                                                                            cityscapes_fine_instance_seg_val_psalm
ov_panoptic   panoptic        coco_panoptic_seg / ade20k_panoptic_seg (PQ)  ade20k_panoptic_val_psalm
grefcoco      gres            gres (cIoU, gIoU, N-acc, T-acc)               grefcoco_val, grefcoco_testA
davis         interactive     davis (J&F)                                   davis17_val
============  ==============  ============================================  ===============================

The model is built from the config and ``MODEL.WEIGHTS`` is loaded with psalm's checkpointer (an empty
``MODEL.WEIGHTS`` or a checkpoint that leaves model parameters missing is an error unless
``--allow-missing-keys``). The evaluation is psalm's one evaluation path
(:mod:`psalm.engine.evaluation`, also behind ``tools/train_net.py --eval-only``, so both give the same
metrics): image tasks run detectron2's ``inference_on_dataset`` on batches of ``TEST.PSALM.IMS_PER_BATCH``
images (:class:`psalm.data.mapper.PSALMDatasetMapper`) with ``psalm.evaluation.build_evaluator``;
``davis`` propagates masks through each video (:mod:`psalm.inference.video`) and scores J&F
(``TEST.PSALM.VIDEO.*``; ``TEST.PSALM.VIDEO.OFFICIAL_GT_RESET True`` reproduces the official
protocol, which reads later-frame ground truth). Precision: ``TEST.PSALM.DTYPE`` ("auto" = bf16
autocast on CUDA; the official numbers are fp32, except OV-semantic in fp16).

Metrics are printed (detectron2 CSV format) and written to
``<output>/results_<task>_<dataset>.json``; evaluator files (predictions, DAVIS PNGs) go to
``<output>/inference``. ``--output`` defaults to ``<OUTPUT_DIR>/eval_zero_shot/<dataset>``.
Data sets are read under ``$DETECTRON2_DATASETS`` (or ``--datasets-root``).
``--num-gpus N`` runs N processes (detectron2 launch; gloo CPU processes without CUDA).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.evaluation import print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

logger = logging.getLogger("psalm.tools.eval_zero_shot")

# --task -> (model task, accepted evaluator types)
ZERO_SHOT_TASKS = OrderedDict(
    ov_semantic=("semantic", ("sem_seg",)),
    ov_instance=("instance", ("coco", "lvis")),
    ov_panoptic=("panoptic", ("coco_panoptic_seg", "ade20k_panoptic_seg")),
    grefcoco=("gres", ("gres",)),
    davis=("interactive", ("davis",)),
)


# ----------------------------------------------------------------------------- arguments / setup
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="PSALM zero-shot evaluation (open-vocabulary segmentation, gRefCOCO, DAVIS)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: tools/eval_zero_shot.py --config-file CFG --task davis --dataset davis17_val MODEL.WEIGHTS W",
    )
    p.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    p.add_argument("--task", required=True, choices=list(ZERO_SHOT_TASKS), help="what to evaluate")
    p.add_argument("--dataset", required=True, help="registered data set name, e.g. ade20k_sem_seg_val_psalm")
    p.add_argument("--output", default=None, help="output folder (default <OUTPUT_DIR>/eval_zero_shot/<dataset>)")
    p.add_argument("--datasets-root", default=None,
                   help="data set root (default $DETECTRON2_DATASETS, else ./datasets)")
    p.add_argument("--allow-missing-keys", action="store_true",
                   help="evaluate even if MODEL.WEIGHTS is empty or leaves model parameters missing (they stay "
                        "random; the metrics are then meaningless)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="initialization URL for multi-process runs")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS psalm.pth")
    return p


def setup(args):
    """Config (frozen) and logging for this process."""
    from psalm.config import get_psalm_cfg
    from psalm.engine.trainer import resolve_device

    opts = list(args.opts or [])
    if opts and opts[0] == "--":
        opts = opts[1:]
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs, got an odd list: {opts}")
    cfg = get_psalm_cfg(args.config_file, opts)
    cfg.OUTPUT_DIR = args.output or os.path.join(cfg.OUTPUT_DIR, "eval_zero_shot", args.dataset)
    resolve_device(cfg)
    cfg.freeze()
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    rank = comm.get_rank()
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name="psalm")
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name="detectron2", abbrev_name="d2")
    logger.info("Command line arguments: %s", args)
    return cfg


def register_datasets(root: str | None) -> None:
    """Register every psalm data set (under ``root`` when given)."""
    from psalm.data.datasets import register_all_psalm_datasets

    if root is not None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--datasets-root {root!r} is not a folder")
        register_all_psalm_datasets(root)
    else:
        import psalm.data.datasets  # noqa: F401  (registers under $DETECTRON2_DATASETS)


def check_dataset_task(task: str, dataset_name: str) -> str:
    """The model task for ``--task`` on ``dataset_name``; a clear error when they do not match."""
    if task not in ZERO_SHOT_TASKS:
        raise ValueError(f"unknown --task {task!r}; choose one of {list(ZERO_SHOT_TASKS)}")
    model_task, accepted = ZERO_SHOT_TASKS[task]
    if dataset_name not in DatasetCatalog.list():
        from psalm.data.datasets import registered_psalm_names

        raise ValueError(
            f"data set {dataset_name!r} is not registered. psalm data sets: {registered_psalm_names()} "
            "(datasets/README.md)"
        )
    et = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if et not in accepted:
        fits = [t for t, (_, types) in ZERO_SHOT_TASKS.items() if et in types]
        hint = f"use --task {fits[0]}" if fits else "it is not a zero-shot benchmark of this tool"
        raise ValueError(
            f"--task {task} evaluates data sets with evaluator_type in {list(accepted)}, but {dataset_name!r} has "
            f"evaluator_type {et!r}: {hint}"
        )
    return model_task


# ----------------------------------------------------------------------------- model
def build_model(cfg, allow_missing_keys: bool = False):
    """The PSALM model in eval mode with ``MODEL.WEIGHTS`` loaded.

    The missing-weights policy of every evaluation (:func:`psalm.engine.evaluation.load_weights_for_evaluation`):
    an empty ``MODEL.WEIGHTS`` or a checkpoint that leaves model tensors missing is an error unless
    ``allow_missing_keys`` (``--allow-missing-keys``).
    """
    from psalm.engine.evaluation import load_weights_for_evaluation
    from psalm.modeling.meta_arch import build_psalm_model

    model = build_psalm_model(cfg)
    load_weights_for_evaluation(model, cfg.MODEL.WEIGHTS, allow_missing=allow_missing_keys)
    model.eval()
    return model


# ----------------------------------------------------------------------------- evaluation
def evaluate(cfg, model, task: str, dataset_name: str):
    """Run the evaluation; returns the evaluator results (``{}`` on non-main ranks).

    The one evaluation path of psalm (:func:`psalm.engine.evaluation.evaluate_dataset`, also behind
    ``tools/train_net.py --eval-only``): ``TEST.PSALM.DTYPE``, ``TEST.PSALM.IMS_PER_BATCH``, the model task
    of ``--task``; DAVIS propagates through each video.
    """
    from psalm.engine.evaluation import evaluate_dataset

    model_task = check_dataset_task(task, dataset_name)
    logger.info("Evaluating %s on %s (model task %s)", task, dataset_name, model_task)
    return evaluate_dataset(cfg, model, dataset_name, model_task, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"))


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def results_path(cfg, task: str, dataset_name: str) -> str:
    return os.path.join(cfg.OUTPUT_DIR, f"results_{task}_{dataset_name}.json")


def main(args):
    """One process: register data, build, load, evaluate, print and write the metrics."""
    register_datasets(args.datasets_root)
    cfg = setup(args)
    check_dataset_task(args.task, args.dataset)  # fail before building the model
    model = build_model(cfg, allow_missing_keys=args.allow_missing_keys)
    results = evaluate(cfg, model, args.task, args.dataset)
    if comm.is_main_process():
        print_csv_format(results)
        path = results_path(cfg, args.task, args.dataset)
        doc = {"task": args.task, "dataset": args.dataset, "weights": cfg.MODEL.WEIGHTS, "results": _json_safe(results)}
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
        logger.info("Results written to %s", path)
    return results


def cli(argv=None):
    from psalm.engine import launch

    args = build_parser().parse_args(argv)
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
