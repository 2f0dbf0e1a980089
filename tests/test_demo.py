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


@pytest.fixture(scope="session")
def psalm_cache(tmp_path_factory):
    """One tiny-tokenizer cache for the session (the first demo run builds it)."""
    return str(tmp_path_factory.getbasetemp() / "psalm_cache")


def _run_demo(cache, *args):
    """Run the demo; returns (exit code, stdout + stderr) (detectron2's logger writes to stdout)."""
    env = dict(os.environ, PSALM_CACHE=cache, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO_ROOT / "demo" / "demo.py"), "--config-file", TINY, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


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
def test_demo_writes_overlay(tmp_path, psalm_cache, task_args):
    out = tmp_path / "overlay.png"
    code, log = _run_demo(psalm_cache, "--input", str(SAMPLE), "--output", str(out), *task_args,
                          "--opts", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu")
    assert code == 0, log[-3000:]
    assert "random initialisation" in log and "tiny test tokenizer" in log
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size == Image.open(SAMPLE).size and im.mode == "RGB"
        overlay = np.asarray(im)
    assert not np.array_equal(overlay, np.asarray(Image.open(SAMPLE).convert("RGB"))), "nothing drawn"


def test_demo_reports_bad_prompt(tmp_path, psalm_cache):
    code, log = _run_demo(psalm_cache, "--input", str(SAMPLE), "--output", str(tmp_path / "o"), "--task",
                          "interactive", "--points", "5000,10", "--opts", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu")
    assert code == 2, log[-3000:]
    assert "outside the 480x320" in log and not (tmp_path / "o").exists()


def test_demo_video_from_first_frame_mask(tmp_path, psalm_cache):
    """VOS: a folder of 3 frames and a DAVIS-style palette PNG for frame 0 -> one overlay and one label map
    per frame, the label maps holding only the given object ids."""
    sample = np.asarray(Image.open(SAMPLE).convert("RGB"))
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(3):
        Image.fromarray(np.ascontiguousarray(sample[4 * t : 4 * t + 240, 6 * t : 6 * t + 320])).save(frames / f"{t:05d}.jpg")
    label = np.zeros((240, 320), np.uint8)
    label[40:160, 100:220] = 1  # the cup
    label[180:230, 20:90] = 3
    first = Image.fromarray(label).convert("P")  # a palette PNG, as DAVIS annotations
    first.save(tmp_path / "first.png")
    out = tmp_path / "vos"
    code, log = _run_demo(psalm_cache, "--video-input", str(frames), "--first-frame-mask", str(tmp_path / "first.png"),
                          "--output", str(out), "--opts", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu")
    assert code == 0, log[-3000:]
    assert "objects [1, 3]" in log
    for t in range(3):
        with Image.open(out / f"{t:05d}.png") as im:
            assert im.size == (320, 240)
        ids = np.asarray(Image.open(out / "masks" / f"{t:05d}.png"))
        assert ids.shape == (240, 320) and set(np.unique(ids).tolist()) <= {0, 1, 3}
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / "00000.png")), label)
