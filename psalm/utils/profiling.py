"""Latency and peak-memory measurement shared by ``tools/benchmark.py`` and ``tools/benchmark_deform_attn.py``.

Memory is measured differently per device, and every report says which (``memory_kind``):

* ``cuda_max_memory_allocated``: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` at the start of the measurement (tensors only, not the caching
  allocator's reserve or the CUDA context);
* ``cpu_max_rss``: the process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
  a high-water mark over the WHOLE process life (imports, model build, earlier measurements).
  ``baseline_rss_mb`` is the resident size just before the measured loop, so
  ``peak - baseline`` bounds what the loop added. Run one measurement per process to isolate it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["MemoryMeter", "time_iterations", "latency_stats", "emit_json", "current_rss_mb", "StageTimer", "profiled"]

_MB = 1024.0 * 1024.0
logger = logging.getLogger(__name__)


def current_rss_mb() -> Optional[float]:
    """The process's current resident set size in MiB (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / _MB


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / _MB  # KiB on Linux, bytes on macOS


class MemoryMeter:
    """``with MemoryMeter(device) as m: ...`` then ``m.report()`` -> dict of memory fields (MiB)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.baseline_mb: Optional[float] = None
        self.peak_mb: Optional[float] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / _MB
        else:
            self.baseline_mb = current_rss_mb()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / _MB
        else:
            self.peak_mb = _max_rss_mb()
        return False

    @property
    def kind(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_max_rss"

    def report(self) -> Dict:
        r = lambda v: None if v is None else round(v, 1)  # noqa: E731
        return {"peak_memory_mb": r(self.peak_mb), "baseline_memory_mb": r(self.baseline_mb), "memory_kind": self.kind}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn: Callable[[], object], iters: int, warmup: int, device: torch.device,
                    before_timed: Optional[Callable[[], object]] = None) -> List[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times; seconds per timed call.

    CUDA work is synchronised before and after each call, so a time covers the whole call.
    ``before_timed`` is called once between the warm-up and the timed calls (e.g. to start a profiler).
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if before_timed is not None:
        before_timed()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def latency_stats(times: List[float], items_per_call: int) -> Dict:
    """Median / mean milliseconds per call and items (images) per second from the median."""
    median = statistics.median(times)
    return {
        "latency_ms_median": round(1000.0 * median, 3),
        "latency_ms_mean": round(1000.0 * statistics.fmean(times), 3),
        "items_per_s": round(items_per_call / median, 3) if median > 0 else None,
    }


def emit_json(record: Dict, stream=None) -> None:
    """Print one measurement as ONE JSON line (sorted keys) and flush."""
    stream = stream or sys.stdout
    stream.write(json.dumps(record, sort_keys=True) + "\n")
    stream.flush()


class StageTimer:
    """Wall time spent in named sub-modules' forwards, summed over calls (device-synchronised).

    ``with StageTimer(model, ["backbone", "pixel_decoder", "llm.model", "predictor"]) as t: ...``
    then ``t.seconds`` -> ``{name: seconds}`` and ``t.calls`` -> ``{name: number of forwards}``.
    Names that ``model`` lacks are left out; nested names are each timed (their times overlap).
    """

    def __init__(self, model: torch.nn.Module, names: List[str], device: torch.device = torch.device("cpu")):
        modules = dict(model.named_modules())
        self.modules = {n: modules[n] for n in names if n in modules}
        self.device = torch.device(device)
        self.seconds = {n: 0.0 for n in self.modules}
        self.calls = {n: 0 for n in self.modules}
        self._handles, self._start = [], {}

    def __enter__(self):
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self._handles.append(mod.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _pre(self, name):
        def hook(module, args):
            _sync(self.device)
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            _sync(self.device)
            self.seconds[name] += time.perf_counter() - self._start.pop(name)
            self.calls[name] += 1

        return hook


class _Profile:
    """What :func:`profiled` yields: ``start()`` begins recording (no-op without a profile)."""

    def __init__(self, prof):
        self.prof, self.started = prof, False

    def start(self):
        if self.prof is not None and not self.started:
            self.prof.start()
            self.started = True


@contextlib.contextmanager
def profiled(out_dir: Optional[str], name: str, device: torch.device, row_limit: int = 60):
    """``torch.profiler`` over the block from ``start()`` on (None ``out_dir``: nothing is recorded).

    Writes ``{out_dir}/{name}_ops.txt`` (operators by self CPU time; by self CUDA time on a GPU),
    ``{name}_ops_by_shape.txt`` (the same, split by input shapes) and ``{name}_trace.json`` (Chrome trace).
    """
    if out_dir is None:
        yield _Profile(None)
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities, record_shapes=True)
    handle = _Profile(prof)
    try:
        yield handle
    finally:
        if handle.started:
            prof.stop()
    if not handle.started:
        return
    os.makedirs(out_dir, exist_ok=True)
    key = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    with open(os.path.join(out_dir, f"{name}_ops.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=row_limit) + "\n")
    with open(os.path.join(out_dir, f"{name}_ops_by_shape.txt"), "w") as f:
        f.write(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=row_limit) + "\n")
    prof.export_chrome_trace(os.path.join(out_dir, f"{name}_trace.json"))
    logger.info("profile of %s written to %s", name, out_dir)
