"""psalm.utils.profiling: stage timing by module hooks, the torch.profiler wrapper, timed iterations."""
import time

import pytest
import torch
from torch import nn

from psalm.utils.profiling import StageTimer, profiled, time_iterations


class _Slow(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x + 1


def test_stage_timer_sums_each_named_module():
    model = nn.Sequential()
    model.add_module("a", _Slow(0.02))
    model.add_module("b", nn.Sequential(_Slow(0.0), _Slow(0.05)))
    with StageTimer(model, ["a", "b", "b.1", "missing"]) as t:
        for _ in range(2):
            model(torch.zeros(1))
    assert set(t.seconds) == {"a", "b", "b.1"} and t.calls == {"a": 2, "b": 2, "b.1": 2}
    assert 0.04 <= t.seconds["a"] < t.seconds["b.1"] <= t.seconds["b"]
    model(torch.zeros(1))  # hooks removed on exit
    assert t.calls["a"] == 2


def test_profiled_writes_tables_only_for_the_timed_calls(tmp_path):
    calls = []

    def step():
        calls.append(1)
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))

    with profiled(str(tmp_path), "demo", torch.device("cpu")) as prof:
        times = time_iterations(step, 2, 1, torch.device("cpu"), before_timed=prof.start)
    assert len(times) == 2 and len(calls) == 3
    ops = (tmp_path / "demo_ops.txt").read_text()
    assert "aten::mm" in ops and (tmp_path / "demo_trace.json").stat().st_size > 0
    assert "[8, 8]" in (tmp_path / "demo_ops_by_shape.txt").read_text()
    with profiled(None, "x", torch.device("cpu")) as prof:  # off: nothing recorded or written
        prof.start()


def test_profiled_never_started_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with profiled(str(tmp_path / "p"), "demo", torch.device("cpu")):
            raise RuntimeError("failed before the timed calls")
    assert not (tmp_path / "p").exists()
