"""SOLVER.LR_SCHEDULER_NAME "WarmupDecayLR" (DeepSpeed's linear warm-up + linear decay to 0) next to
detectron2's schedules, through the trainer's build_lr_scheduler."""
import pytest
import torch

from psalm.config import get_psalm_cfg
from psalm.engine import PSALMTrainer


def _lrs(*opts, steps):
    cfg = get_psalm_cfg(None, ["SOLVER.BASE_LR", 0.5, "SOLVER.MAX_ITER", 100, *opts])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    sched = PSALMTrainer.build_lr_scheduler(cfg, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, sched


def deepspeed_warmup_decay(t, base, warmup, total, start_factor):
    """DeepSpeed WarmupDecayLR (warmup_type 'linear', warmup_min_lr = start_factor * base), written out."""
    if t < warmup:
        return base * (start_factor + (1 - start_factor) * t / warmup)
    return base * max(0.0, (total - t) / (total - warmup))


@pytest.mark.parametrize("warmup,factor", [(10, 0.0), (10, 0.1), (0, 1.0)])
def test_warmup_decay_follows_deepspeed(warmup, factor):
    lrs, _ = _lrs("SOLVER.LR_SCHEDULER_NAME", "WarmupDecayLR", "SOLVER.WARMUP_ITERS", warmup,
                  "SOLVER.WARMUP_FACTOR", factor, "SOLVER.WARMUP_METHOD", "linear", steps=101)
    want = [deepspeed_warmup_decay(t, 0.5, warmup, 100, factor) for t in range(101)]
    assert lrs == pytest.approx(want, abs=1e-9)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and max(lrs) == pytest.approx(0.5)


def test_warmup_decay_resumes_exactly():
    opts = ("SOLVER.LR_SCHEDULER_NAME", "WarmupDecayLR", "SOLVER.WARMUP_ITERS", 10, "SOLVER.WARMUP_METHOD", "linear")
    full, _ = _lrs(*opts, steps=60)
    _, sched = _lrs(*opts, steps=30)
    cfg = get_psalm_cfg(None, ["SOLVER.BASE_LR", 0.5, "SOLVER.MAX_ITER", 100, *opts])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    resumed = PSALMTrainer.build_lr_scheduler(cfg, opt)
    resumed.load_state_dict(sched.state_dict())
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])  # [0] is the optimizer's own lr: the schedule applies from step 1
        opt.step()
        resumed.step()
    assert lrs[1:] == pytest.approx(full[31:60], abs=1e-12)


def test_detectron2_schedules_unchanged_and_bad_settings_refused():
    cos, _ = _lrs("SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.WARMUP_ITERS", 0, steps=51)
    assert cos[0] == pytest.approx(0.5) and cos[50] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="WARMUP_METHOD 'linear'"):
        _lrs("SOLVER.LR_SCHEDULER_NAME", "WarmupDecayLR", "SOLVER.WARMUP_ITERS", 5, "SOLVER.WARMUP_METHOD", "constant",
             steps=1)
    with pytest.raises(ValueError, match="WARMUP_ITERS < SOLVER.MAX_ITER"):
        _lrs("SOLVER.LR_SCHEDULER_NAME", "WarmupDecayLR", "SOLVER.WARMUP_ITERS", 100, "SOLVER.WARMUP_METHOD", "linear",
             steps=1)
