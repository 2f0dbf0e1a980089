#!/usr/bin/env python
"""The instruction (LM) loss step: full-vocabulary logits at every position vs logits at the targets only.

Prints ONE JSON line per implementation: ``impl`` (``full_logits``: ``llm(...).logits`` [B, L, V]
then the shifted cross-entropy, as psalm did before; ``targets_only``:
:func:`psalm.modeling.llm.causal_lm_loss`), latency of forward + backward (median / mean ms over
``--iters``; the two implementations are called ALTERNATELY in one process, so machine noise hits
both alike), ``logits_bytes`` (size of the fp32 logits each builds, from the shapes), the loss
value (the two agree) and the batch shape. The LLM is built from ``--config-file`` (random
weights); the batch is B sequences of L positions with ``--targets`` supervised tokens at the end
of each (the answer of a LLaVA sample; the image tokens and prompt before it have no label).

    python tools/benchmark_lm_loss.py --config-file configs/tiny/Base-PSALM-tiny.yaml \\
        --opts MODEL.PSALM.LLM.VOCAB_SIZE 50297
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from psalm.config import get_psalm_cfg
from psalm.modeling.llm import build_llm, causal_lm_loss
from psalm.utils.profiling import emit_json

logger = logging.getLogger("psalm.benchmark_lm_loss")
IGNORE = -100


def full_logits_loss(llm, embeds, mask, labels):
    """The previous loss: lm_head at every position, [B, L, V] fp32 logits, shifted cross-entropy."""
    logits = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1)
    return F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum") / (target != IGNORE).sum()


def targets_only_loss(llm, embeds, mask, labels):
    hidden = llm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    return causal_lm_loss(llm, hidden, labels)


IMPLS = {"full_logits": full_logits_loss, "targets_only": targets_only_loss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", default="configs/tiny/Base-PSALM-tiny.yaml", metavar="FILE")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=600, help="positions per sequence (256 image tokens + text)")
    p.add_argument("--targets", type=int, default=40, help="supervised answer tokens per sequence")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if not 0 < args.targets < args.length:
        raise SystemExit("error: need 0 < --targets < --length")
    cfg = get_psalm_cfg(args.config_file, args.opts)
    torch.manual_seed(0)
    llm = build_llm(cfg).train()
    B, L, H, V = args.batch_size, args.length, llm.config.hidden_size, llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(B, L, H, generator=g) * 0.02
    mask = torch.ones(B, L, dtype=torch.bool)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    labels[:, L - args.targets:] = torch.randint(0, V, (B, args.targets), generator=g)
    n_targets = int((labels[:, 1:] != IGNORE).sum())

    times = {k: [] for k in IMPLS}
    losses = {}
    for i in range(args.warmup + args.iters):
        for name, fn in IMPLS.items():  # alternate: the same load for both
            llm.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = fn(llm, embeds, mask, labels)
            loss.backward()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
            losses[name] = float(loss)
    for name in IMPLS:
        rows = B * L if name == "full_logits" else n_targets
        emit_json({
            "impl": name, "config": args.config_file, "batch_size": B, "length": L, "targets_per_sequence":
            args.targets, "vocab_size": V, "hidden_size": H, "iters": args.iters, "warmup": args.warmup,
            "latency_ms_median": round(1000 * statistics.median(times[name]), 3),
            "latency_ms_mean": round(1000 * statistics.fmean(times[name]), 3),
            "logits_bytes": rows * V * 4, "loss": losses[name], "torch_threads": torch.get_num_threads(),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
