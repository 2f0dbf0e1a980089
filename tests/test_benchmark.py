"""tools/benchmark.py and tools/benchmark_deform_attn.py print well-formed JSON lines (fields, not timings)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")


@pytest.fixture(scope="session")
def psalm_cache(tmp_path_factory):
    """One tiny-tokenizer cache for the session."""
    return str(tmp_path_factory.getbasetemp() / "psalm_cache")


def _json_lines(cmd, cache):
    env = dict(os.environ, PSALM_CACHE=cache, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=str(REPO_ROOT),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]  # every stdout line must be JSON


def test_benchmark_model_json_lines(psalm_cache):
    records = _json_lines([str(REPO_ROOT / "tools" / "benchmark.py"), "--config-file", TINY, "--task", "referring",
                           "--mode", "both", "--isolate", "none", "--iters", "1", "--warmup", "0",
                           "--opts", "MODEL.DEVICE", "cpu"], psalm_cache)
    assert [r["mode"] for r in records] == ["inference", "train"]
    assert [r["optimizer"] for r in records] == [None, "adamw"]
    assert [r["prompts"] for r in records] == ["data", "data"]  # tokenised before the step, as the mapper does
    for r in records:
        assert r["config"] == TINY and r["task"] == "referring" and r["device"] == "cpu" and r["dtype"] == "fp32"
        assert r["batch_size"] == 1 and r["image_size"] == 256 and r["iters"] == 1 and r["warmup"] == 0
        assert r["memory_kind"] == "cpu_max_rss" and r["peak_memory_mb"] > 0
        assert r["latency_ms_median"] > 0 and r["latency_ms_mean"] > 0 and r["images_per_s"] > 0
        assert r["num_parameters"] > 0 and r["classes"] == "synthetic" and r["profiled"] is False
        assert r["torch_threads"] == 1
        assert set(r["stage_s_per_iter"]) == {"backbone", "pixel_decoder", "projector", "llm.model", "predictor"}
        assert all(v > 0 for v in r["stage_s_per_iter"].values())
        assert r["stage_calls_per_iter"]["backbone"] == 1 and r["stage_calls_per_iter"]["llm.model"] == 1
        # (S / 64)^2 image tokens (16 for the tiny 256 x 256 input) + the prompt text
        assert r["llm_batch_and_length"][0] == 1 and r["llm_batch_and_length"][1] > (r["image_size"] // 64) ** 2


def test_benchmark_prompts_in_the_model_and_cuda_refusal(psalm_cache):
    """--prompts model times the tokenisation inside the step (the path before prompts moved to the data
    path); a CUDA device on a machine without CUDA is an error, not a CPU figure labelled as a GPU one."""
    import torch

    cmd = [str(REPO_ROOT / "tools" / "benchmark.py"), "--config-file", TINY, "--task", "panoptic", "--mode", "train",
           "--isolate", "none", "--iters", "1", "--warmup", "0", "--prompts", "model", "--opts", "MODEL.DEVICE", "cpu"]
    (r,) = _json_lines(cmd, psalm_cache)
    assert r["prompts"] == "model" and r["mode"] == "train" and r["latency_ms_median"] > 0
    if not torch.cuda.is_available():
        env = dict(os.environ, PSALM_CACHE=psalm_cache, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, *cmd[:-1], "cuda"], capture_output=True, text=True, env=env,
                              cwd=str(REPO_ROOT), timeout=300)
        assert proc.returncode != 0 and "CUDA is not available" in proc.stderr and not proc.stdout.strip()


def test_benchmark_deform_attn_json_lines(capsys):
    """In-process (no subprocess: the tool's own measurement code, without the import cost)."""
    spec = importlib.util.spec_from_file_location("psalm_bench_deform", REPO_ROOT / "tools" / "benchmark_deform_attn.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--config-file", TINY, "--isolate", "none", "--iters", "1", "--warmup", "0",
                      "--opts", "MODEL.DEVICE", "cpu"]) == 0
    records = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    try:
        import torch_ms_deform_attn  # noqa: F401

        impls = ("kernel", "pytorch")
    except ImportError:  # optional package: only the reference path is measured
        impls = ("pytorch",)
    assert {(r["impl"], r["mode"]) for r in records} == {(i, m) for i in impls for m in ("forward", "train")}
    for r in records:
        assert r["levels"] == [[32, 32], [16, 16], [8, 8]] and r["d_model"] == 64 and r["n_heads"] == 4
        assert r["n_points"] == 4 and r["batch_size"] == 1 and r["memory_kind"] == "cpu_max_rss"
        assert r["latency_ms_median"] > 0 and r["peak_memory_mb"] > 0 and r["device"] == "cpu"
        if r["impl"] == "pytorch":
            diff = r["max_abs_diff_vs_kernel"]
            assert (diff is None) if impls == ("pytorch",) else (0 <= diff < 1e-4)


def test_benchmark_lm_loss_json_lines(capsys):
    """In-process: both implementations are timed and give the same loss; logits sizes from the shapes."""
    spec = importlib.util.spec_from_file_location("psalm_bench_lm", REPO_ROOT / "tools" / "benchmark_lm_loss.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--config-file", TINY, "--batch-size", "2", "--length", "30", "--targets", "5",
                      "--iters", "1", "--warmup", "0"]) == 0
    records = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert [r["impl"] for r in records] == ["full_logits", "targets_only"]
    full, ours = records
    V = full["vocab_size"]
    assert full["logits_bytes"] == 2 * 30 * V * 4 and ours["logits_bytes"] == 2 * 5 * V * 4
    assert abs(full["loss"] - ours["loss"]) <= 1e-5 * abs(full["loss"])
    assert full["latency_ms_median"] > 0 and ours["latency_ms_median"] > 0
