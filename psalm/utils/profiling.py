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

import json
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["MemoryMeter", "time_iterations", "latency_stats", "emit_json", "current_rss_mb"]

_MB = 1024.0 * 1024.0


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


def time_iterations(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> List[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times; seconds per timed call.

    CUDA work is synchronised before and after each call, so a time covers the whole call.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
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
