#!/usr/bin/env python
"""Compiled multi-scale deformable attention kernel vs the pure-PyTorch path: time and memory.

The shapes are those of the pixel decoder's deformable encoder (self-attention over the res3..res5
maps, batch 1), read from the config: d_model = ``SEM_SEG_HEAD.CONVS_DIM``, heads / points =
``DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS`` / ``_N_POINTS``, levels S/8, S/16, S/32 for
S = ``INPUT.IMAGE_SIZE``. Without ``--config-file`` these are the paper's 1024^2 shapes: levels
128^2, 64^2, 32^2, 256 dims, 8 heads, 4 points.

One JSON line per (implementation, mode): ``forward`` (no grad) and ``train`` (forward + backward),
with median / mean latency and peak memory (see :mod:`psalm.utils.profiling`); the pytorch lines
also carry ``max_abs_diff_vs_kernel`` (outputs of the two implementations with the same weights).
On CPU each measurement runs in its own process (``--isolate process``, default) so that the RSS
peak belongs to that measurement alone.

    python tools/benchmark_deform_attn.py                                          # 1024^2 shapes
    python tools/benchmark_deform_attn.py --config-file configs/tiny/Base-PSALM-tiny.yaml --iters 3
    python tools/benchmark_deform_attn.py --opts MODEL.DEVICE cuda
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import torch

from psalm.config import get_psalm_cfg
from psalm.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn, resolve_deform_attn_impl
from psalm.predictor import resolve_device
from psalm.utils.profiling import MemoryMeter, emit_json, latency_stats, time_iterations

logger = logging.getLogger("psalm.benchmark_deform_attn")

STRIDES = (8, 16, 32)
IMPLS = ("kernel", "pytorch")
MODES = ("forward", "train")


def shapes_from_cfg(cfg) -> dict:
    size = int(cfg.INPUT.IMAGE_SIZE)
    head = cfg.MODEL.SEM_SEG_HEAD
    return {
        "image_size": size,
        "levels": [[size // s, size // s] for s in STRIDES],
        "d_model": int(head.CONVS_DIM),
        "n_heads": int(head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS),
        "n_points": int(head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS),
        "batch_size": 1,
    }


def build_case(shapes: dict, device: torch.device, seed: int = 0):
    """(module factory, inputs): encoder self-attention, query = value positions, random features."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor(shapes["levels"], dtype=torch.long)
    n = int((levels[:, 0] * levels[:, 1]).sum())
    start = torch.cat([levels.new_zeros(1), (levels[:, 0] * levels[:, 1]).cumsum(0)[:-1]])
    d = shapes["d_model"]
    src = torch.randn(shapes["batch_size"], n, d, generator=g)
    # reference points: every position's own normalised centre, on every level (as the encoder does)
    refs = []
    for h, w in shapes["levels"]:
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        refs.append(torch.stack([xs.flatten() / w, ys.flatten() / h], -1))
    ref = torch.cat(refs)[None, :, None, :].expand(shapes["batch_size"], n, len(shapes["levels"]), 2)
    torch.manual_seed(seed)
    proto = MSDeformAttn(d, len(shapes["levels"]), shapes["n_heads"], shapes["n_points"], impl="pytorch")
    with torch.no_grad():  # non-trivial offsets and weights (the init has zero attention logits)
        for p in (proto.sampling_offsets.weight, proto.attention_weights.weight):
            p.normal_(0.0, 0.02, generator=g)
    state = proto.state_dict()

    def make(impl: str) -> MSDeformAttn:
        m = MSDeformAttn(d, len(shapes["levels"]), shapes["n_heads"], shapes["n_points"], impl=impl)
        m.load_state_dict(state)
        return m.to(device)

    inputs = (src.to(device), ref.contiguous().to(device), levels.to(device), start.to(device))
    return make, inputs


def measure(shapes: dict, impl: str, mode: str, device: torch.device, iters: int, warmup: int) -> dict:
    make, (src, ref, levels, start) = build_case(shapes, device)
    module = make(impl)
    src = src.requires_grad_(mode == "train")

    def step():
        if mode == "forward":
            with torch.no_grad():
                return module(src, ref, src, levels, start)
        out = module(src, ref, src, levels, start)
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)
        src.grad = None

    with MemoryMeter(device) as mem:
        times = time_iterations(step, iters, warmup, device)
    record = {"impl": impl, "mode": mode, **latency_stats(times, shapes["batch_size"]), **mem.report()}
    if impl == "pytorch":
        with torch.no_grad():
            reference = make("kernel")(src, ref, src, levels, start) if _kernel_available() else None
            ours = module(src, ref, src, levels, start)
        record["max_abs_diff_vs_kernel"] = None if reference is None else float((ours - reference).abs().max())
    return record


def _kernel_available() -> bool:
    try:
        resolve_deform_attn_impl("kernel")
    except RuntimeError:
        return False
    return True


def _run_isolated(args, impl: str, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", f"{impl}:{mode}", "--iters", str(args.iters),
           "--warmup", str(args.warmup)]
    if args.config_file:
        cmd += ["--config-file", args.config_file]
    if args.opts:
        cmd += ["--opts", *args.opts]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {impl}:{mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", default="", help="config (default: the built-in full-size defaults)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impl", choices=IMPLS + ("both",), default="both")
    p.add_argument("--mode", choices=MODES + ("both",), default="both")
    p.add_argument("--isolate", choices=("process", "none"), default="process",
                   help="CPU: one process per measurement so that each RSS peak is its own (default)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    cfg = get_psalm_cfg(args.config_file or None, args.opts)
    try:  # a CUDA device on a machine without CUDA is an error: a CPU figure is not a GPU figure
        device = resolve_device(cfg.MODEL.DEVICE)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    shapes = shapes_from_cfg(cfg)
    common = {"config": args.config_file or "defaults", "device": str(device), "dtype": "fp32",
              "iters": args.iters, "warmup": args.warmup, **shapes}
    if args._worker:
        impl, mode = args._worker.split(":")
        emit_json({**common, **measure(shapes, impl, mode, device, args.iters, args.warmup)})
        return 0
    impls = IMPLS if args.impl == "both" else (args.impl,)
    if "kernel" in impls and not _kernel_available():
        logger.warning("the compiled kernel (torch-ms-deform-attn) is not importable: measuring the pytorch path only")
        impls = tuple(i for i in impls if i != "kernel")
    modes = MODES if args.mode == "both" else (args.mode,)
    isolate = args.isolate == "process" and device.type == "cpu"
    for impl in impls:
        for mode in modes:
            if isolate:
                emit_json({**common, **_run_isolated(args, impl, mode)})
            else:
                emit_json({**common, **measure(shapes, impl, mode, device, args.iters, args.warmup)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
