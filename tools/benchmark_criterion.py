#!/usr/bin/env python
"""The segmentation criterion alone (Hungarian matching + losses over every deep-supervision stage): time.

Shapes from the config (default: the paper's: S = 1024, stride-4 masks 256^2, Q = 100 queries, DEC_LAYERS = 10
stages, TRAIN_NUM_POINTS = 112^2); random predictor outputs of a category task (``--classes`` K + 1 scores)
and ``--targets`` random GT masks per image at S x S. One JSON line: median / mean milliseconds of
``criterion(outputs, targets)`` plus the backward of the summed loss, for ``--batch-size`` images.

    python tools/benchmark_criterion.py
    python tools/benchmark_criterion.py --config-file configs/tiny/Base-PSALM-tiny.yaml
"""
from __future__ import annotations

import argparse

import torch

from psalm.config import get_psalm_cfg
from psalm.modeling.criterion import SetCriterion
from psalm.utils.profiling import emit_json, latency_stats, time_iterations


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", default="", metavar="FILE", help="default: the paper's model config")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--targets", type=int, default=15, help="GT masks per image")
    p.add_argument("--classes", type=int, default=133, help="K (category logits have K + 1 entries)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = p.parse_args(argv)
    cfg = get_psalm_cfg(args.config_file or None, args.opts)
    mf = cfg.MODEL.MASK_FORMER
    S, B, Q = int(cfg.INPUT.IMAGE_SIZE), args.batch_size, int(mf.NUM_OBJECT_QUERIES)
    h = S // int(cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE)
    g = torch.Generator().manual_seed(args.seed)

    def stage():
        return {
            "pred_masks": torch.randn(B, Q, h, h, generator=g).requires_grad_(),
            "pred_class_logits": torch.randn(B, Q, args.classes + 1, generator=g).requires_grad_(),
        }

    outputs = {**stage(), "aux_outputs": [stage() for _ in range(int(mf.DEC_LAYERS) - 1)]}
    targets = [
        {"masks": torch.rand(args.targets, S, S, generator=g) > 0.7,
         "labels": torch.randint(0, args.classes, (args.targets,), generator=g)}
        for _ in range(B)
    ]
    criterion = SetCriterion(cfg)
    torch.manual_seed(args.seed)

    def step():
        sum(criterion(outputs, targets).values()).backward()

    times = time_iterations(step, args.iters, args.warmup, torch.device("cpu"))
    emit_json({
        "what": "SetCriterion forward + backward", "config": args.config_file or "paper", "image_size": S,
        "batch_size": B, "queries": Q, "stages": int(mf.DEC_LAYERS), "targets_per_image": args.targets,
        "num_points": int(mf.TRAIN_NUM_POINTS), "torch_threads": torch.get_num_threads(), "iters": args.iters,
        **latency_stats(times, B),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
