"""Optimiser, trainable-parameter selection and gradient clipping for PSALM training.

* ``SOLVER.OPTIMIZER``: ``"ADAMW"`` (PSALM: betas ``SOLVER.BETAS``, eps ``SOLVER.EPS``, weight decay
  ``SOLVER.WEIGHT_DECAY``, 0 by default) or ``"SGD"`` (detectron2's ``MOMENTUM`` / ``NESTEROV``).
  Parameter groups come from detectron2's ``get_default_optimizer_params`` (norm / bias overrides).
* ``SOLVER.OPTIMIZER_IMPL``: torch's kernel for the update: ``"fused"`` (one kernel over all
  parameters, CPU and CUDA; 4x faster than the per-tensor loop on the CPU job), ``"foreach"``,
  ``"for_loop"``, or ``"auto"`` (default: ``"fused"``, except under FSDP, where torch chooses).
  All give the same update up to float rounding.
* ``SOLVER.SHARDING == "zero"`` with more than one process wraps the optimiser in
  ``torch.distributed.optim.ZeroRedundancyOptimizer`` (optimiser states sharded across ranks).
* ``SOLVER.TRAINABLE_PARAMETERS``: ``fnmatch`` patterns of parameter names; when given, every other
  parameter is frozen (stage 1: ``["projector.*"]``).
* ``SOLVER.LR_SCHEDULER_NAME``: detectron2's (``"WarmupMultiStepLR"``, ``"WarmupCosineLR"``) or
  ``"WarmupDecayLR"`` (DeepSpeed's, which LLaVA-family code such as PixelLM trains with): a linear ramp
  from ``WARMUP_FACTOR`` x ``BASE_LR`` to ``BASE_LR`` over ``WARMUP_ITERS``, then a linear decay that
  reaches 0 at ``MAX_ITER`` (:func:`build_lr_scheduler`).
* ``SOLVER.CLIP_GRADIENTS``: ``CLIP_TYPE`` ``"full_model"`` (one norm over all gradients, as
  Mask2Former), ``"norm"`` (per parameter, detectron2) or ``"value"``. Applied by the trainer after
  gradient unscaling, never by wrapping the optimiser class.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Iterable, Optional

import torch
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils import comm

__all__ = [
    "build_optimizer",
    "build_lr_scheduler",
    "apply_trainable_patterns",
    "clip_gradients",
    "OPTIMIZERS",
    "OPTIMIZER_IMPLS",
]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("ADAMW", "SGD")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for_loop")
CLIP_TYPES = ("full_model", "norm", "value")


def apply_trainable_patterns(model: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    """Freeze every parameter whose name matches none of ``patterns`` (no-op for no patterns).

    Returns:
        the names of the parameters left trainable.

    Raises:
        ValueError: a pattern matches no parameter (a typo must not freeze the whole model).
    """
    patterns = list(patterns)
    if not patterns:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(
                f"SOLVER.TRAINABLE_PARAMETERS pattern {pat!r} matches no parameter of the model "
                f"(names look like {names[:3]})"
            )
    trainable = []
    for name, p in model.named_parameters():
        keep = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    logger.info("SOLVER.TRAINABLE_PARAMETERS %s: %d of %d parameter tensors trainable", patterns, len(trainable),
                len(names))
    return trainable


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimiser of ``model``'s trainable parameters (call after DDP / FSDP wrapping)."""
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {cfg.SOLVER.OPTIMIZER!r}")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    if not params:
        raise ValueError("the model has no trainable parameter (check SOLVER.TRAINABLE_PARAMETERS / freezing)")
    if name == "ADAMW":
        betas = tuple(float(b) for b in cfg.SOLVER.BETAS)
        if len(betas) != 2:
            raise ValueError(f"SOLVER.BETAS must have two values, got {cfg.SOLVER.BETAS}")
        cls, kwargs = torch.optim.AdamW, {
            "lr": cfg.SOLVER.BASE_LR,
            "betas": betas,
            "eps": cfg.SOLVER.EPS,
            "weight_decay": cfg.SOLVER.WEIGHT_DECAY,
        }
    else:
        cls, kwargs = torch.optim.SGD, {
            "lr": cfg.SOLVER.BASE_LR,
            "momentum": cfg.SOLVER.MOMENTUM,
            "nesterov": cfg.SOLVER.NESTEROV,
            "weight_decay": cfg.SOLVER.WEIGHT_DECAY,
        }
    kwargs.update(_impl_kwargs(cfg))
    if cfg.SOLVER.SHARDING == "zero" and comm.get_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)
    return cls(params, **kwargs)


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """detectron2's ``build_lr_scheduler`` plus ``"WarmupDecayLR"`` (module docstring), built from fvcore's
    param schedulers under detectron2's ``LRMultiplier`` (so it checkpoints and resumes like the others).

    ``WarmupDecayLR`` at iteration t, w = ``WARMUP_ITERS``, T = ``MAX_ITER``, f = ``WARMUP_FACTOR``:
    ``BASE_LR * (f + (1 - f) * t / w)`` for t < w, then ``BASE_LR * (T - t) / (T - w)`` (DeepSpeed's
    ``WarmupDecayLR`` with ``warmup_type "linear"`` and ``warmup_min_lr = f * BASE_LR``).
    """
    from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
    from detectron2.solver.lr_scheduler import LRMultiplier
    from fvcore.common.param_scheduler import CompositeParamScheduler, LinearParamScheduler

    s = cfg.SOLVER
    if s.LR_SCHEDULER_NAME != "WarmupDecayLR":
        return d2_build_lr_scheduler(cfg, optimizer)
    if s.WARMUP_METHOD != "linear":
        raise ValueError(f"SOLVER.LR_SCHEDULER_NAME 'WarmupDecayLR' warms up linearly; set SOLVER.WARMUP_METHOD "
                         f"'linear' (got {s.WARMUP_METHOD!r})")
    max_iter, warmup = int(s.MAX_ITER), int(s.WARMUP_ITERS)
    if max_iter < 1 or not 0 <= warmup < max_iter:
        raise ValueError(f"WarmupDecayLR needs 0 <= SOLVER.WARMUP_ITERS < SOLVER.MAX_ITER, got {warmup} / {max_iter}")
    decay = LinearParamScheduler(1.0, 0.0)
    if warmup == 0:
        sched = decay
    else:
        w = warmup / max_iter
        sched = CompositeParamScheduler([LinearParamScheduler(float(s.WARMUP_FACTOR), 1.0), decay],
                                        lengths=[w, 1.0 - w], interval_scaling=["rescaled", "rescaled"])
    return LRMultiplier(optimizer, multiplier=sched, max_iter=max_iter)


def _impl_kwargs(cfg) -> dict:
    """torch optimiser keyword for ``SOLVER.OPTIMIZER_IMPL``."""
    impl = cfg.SOLVER.OPTIMIZER_IMPL
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"SOLVER.OPTIMIZER_IMPL must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    if impl == "auto":
        # FSDP parameters are DTensors: leave the choice to torch there
        impl = "fused" if cfg.SOLVER.SHARDING != "fsdp" else None
    return {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for_loop": {"foreach": False, "fused": False},
        None: {},
    }[impl]


def clip_gradients(clip_cfg, parameters: Iterable[torch.nn.Parameter]) -> Optional[torch.Tensor]:
    """Clip gradients in place per ``SOLVER.CLIP_GRADIENTS``.

    Returns:
        the total gradient norm before clipping for ``"full_model"``, else None.
    """
    if not clip_cfg.ENABLED:
        return None
    params = [p for p in parameters if p.grad is not None]
    clip_type = clip_cfg.CLIP_TYPE
    if clip_type == "full_model":
        norm = torch.nn.utils.clip_grad_norm_(params, clip_cfg.CLIP_VALUE, clip_cfg.NORM_TYPE)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if clip_type == "norm":
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], clip_cfg.CLIP_VALUE, clip_cfg.NORM_TYPE)
        return None
    if clip_type == "value":
        torch.nn.utils.clip_grad_value_(params, clip_cfg.CLIP_VALUE)
        return None
    raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of {CLIP_TYPES}, got {clip_type!r}")
