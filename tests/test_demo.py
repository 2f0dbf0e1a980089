"""demo/demo.py end to end as a user runs it: a subprocess on demo/sample.jpg with the tiny config and
random weights (CPU). Checks that a valid overlay image of the input's size was written."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")
SAMPLE = REPO_ROOT / "demo" / "sample.jpg"


def _run_demo(tmp_path, *args):
    env = dict(os.environ, PSALM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO_ROOT / "demo" / "demo.py"), "--config-file", TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=300)


def test_sample_image_is_small_and_valid():
    assert SAMPLE.stat().st_size < 100 * 1024
    with Image.open(SAMPLE) as im:
        assert im.format == "JPEG" and im.mode == "RGB"


@pytest.mark.parametrize(
    "task_args",
    [
        ["--task", "panoptic", "--classes", "cup", "saucer,spoon", "wooden table"],
        ["--task", "interactive", "--points", "240,150", "--box", "150,40,330,260"],
    ],
    ids=["panoptic", "interactive"],
)
def test_demo_writes_overlay(tmp_path, task_args):
    out = tmp_path / "overlay.png"
    proc = _run_demo(tmp_path, "--input", str(SAMPLE), "--output", str(out), *task_args,
                     "--opts", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random initialisation" in proc.stderr and "tiny test tokenizer" in proc.stderr
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size == Image.open(SAMPLE).size and im.mode == "RGB"
        overlay = np.asarray(im)
    assert not np.array_equal(overlay, np.asarray(Image.open(SAMPLE).convert("RGB"))), "nothing drawn"


def test_demo_reports_bad_prompt(tmp_path):
    proc = _run_demo(tmp_path, "--input", str(SAMPLE), "--output", str(tmp_path / "o"), "--task", "interactive",
                     "--points", "5000,10", "--opts", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu")
    assert proc.returncode == 2
    assert "outside the 480x320" in proc.stderr
