"""demo/demo.py as a user runs it: one subprocess on demo/sample.jpg with the tiny config and random
weights (--random-weights, CPU) that must write a valid overlay PNG of the input's size; the other command
lines (interactive prompts, errors, video, --model DIR, no weights) run in-process with one shared
predictor to stay fast."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")
SAMPLE = REPO_ROOT / "demo" / "sample.jpg"
OPTS = ["--random-weights", "--opts", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]


@pytest.fixture(scope="session")
def psalm_cache(tmp_path_factory):
    """One tiny-tokenizer cache for the session (the first demo run builds it)."""
    return str(tmp_path_factory.getbasetemp() / "psalm_cache")


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("psalm_demo_script", REPO_ROOT / "demo" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_predictor(demo, psalm_cache):
    args = demo.get_parser().parse_args(["--config-file", TINY, "--input", str(SAMPLE), *OPTS])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PSALM_CACHE", psalm_cache)
        return demo.PSALMPredictor(demo.setup_cfg(args))


def _sample():
    return np.asarray(Image.open(SAMPLE).convert("RGB"))


def test_sample_image_is_small_and_valid():
    assert SAMPLE.stat().st_size < 100 * 1024
    with Image.open(SAMPLE) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (480, 320)


def test_demo_subprocess_writes_overlay(tmp_path, psalm_cache):
    out = tmp_path / "overlay.png"
    env = dict(os.environ, PSALM_CACHE=psalm_cache, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO_ROOT / "demo" / "demo.py"), "--config-file", TINY, "--input", str(SAMPLE),
           "--output", str(out), "--task", "panoptic", "--classes", "cup", "saucer,spoon", "wooden table", *OPTS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=300)
    log = proc.stdout + proc.stderr  # detectron2's logger writes to stdout
    assert proc.returncode == 0, log[-3000:]
    assert "random initialisation" in log and "tiny test tokenizer" in log
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (480, 320)
        overlay = np.asarray(im)
    assert not np.array_equal(overlay, _sample()), "nothing drawn"


def test_demo_interactive_folder_output(demo, demo_predictor, tmp_path):
    args = demo.get_parser().parse_args(
        ["--config-file", TINY, "--input", str(REPO_ROOT / "demo" / "*.jpg"), "--output", str(tmp_path / "o"),
         "--task", "interactive", "--points", "240,150", "--box", "150,40,330,260", "--scribble", "10,10;100,50"])
    demo.run(args, demo_predictor)
    with Image.open(tmp_path / "o" / "sample.png") as im:
        assert im.size == (480, 320)
        assert not np.array_equal(np.asarray(im.convert("RGB")), _sample())


def test_demo_errors(demo, demo_predictor, tmp_path):
    base = ["--config-file", TINY, "--input", str(SAMPLE), "--output", str(tmp_path / "o")]
    args = demo.get_parser().parse_args(base + ["--task", "interactive", "--points", "5000,10"])
    with pytest.raises(ValueError, match="outside the 480x320"):
        demo.run(args, demo_predictor)
    args = demo.get_parser().parse_args(base + ["--task", "referring"])
    with pytest.raises(ValueError, match="needs text"):
        demo.run(args, demo_predictor)
    assert not (tmp_path / "o" / "sample.png").exists()
    with pytest.raises(SystemExit, match="matches no file"):
        demo.run(demo.get_parser().parse_args(["--input", str(tmp_path / "*.png"), "--task", "referring"]),
                 demo_predictor)
    with pytest.raises(SystemExit, match="exactly one of"):
        demo.main(["--config-file", TINY])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_refuses_a_cuda_device_without_cuda(demo, tmp_path, caplog):
    """MODEL.DEVICE cuda on a machine without CUDA is an error (exit code 2, the fix in the message), never a
    silent CPU run."""
    out = tmp_path / "o.png"
    rc = demo.main(["--config-file", TINY, "--random-weights", "--input", str(SAMPLE), "--output", str(out),
                    "--task", "referring", "--prompt", "x", "--opts", "MODEL.DEVICE", "cuda"])
    assert rc == 2 and not out.exists()
    assert "MODEL.DEVICE='cuda' but CUDA is not available" in caplog.text and "MODEL.DEVICE cpu" in caplog.text


def test_demo_video_from_first_frame_mask(demo, demo_predictor, tmp_path):
    """VOS: a folder of 3 frames and a DAVIS-style palette PNG for frame 0 -> one overlay and one label map
    per frame, the label maps holding only the given object ids."""
    sample = _sample()
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(3):
        crop = np.ascontiguousarray(sample[4 * t : 4 * t + 240, 6 * t : 6 * t + 320])
        Image.fromarray(crop).save(frames / f"{t:05d}.jpg")
    label = np.zeros((240, 320), np.uint8)
    label[40:160, 100:220] = 1  # the cup
    label[180:230, 20:90] = 3
    Image.fromarray(label).convert("P").save(tmp_path / "first.png")  # a palette PNG, as DAVIS annotations
    out = tmp_path / "vos"
    args = demo.get_parser().parse_args(["--config-file", TINY, "--video-input", str(frames), "--first-frame-mask",
                                         str(tmp_path / "first.png"), "--output", str(out)])
    demo.run(args, demo_predictor)
    for t in range(3):
        with Image.open(out / f"{t:05d}.png") as im:
            assert im.size == (320, 240)
        ids = np.asarray(Image.open(out / "masks" / f"{t:05d}.png"))
        assert ids.shape == (240, 320) and set(np.unique(ids).tolist()) <= {0, 1, 3}
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / "00000.png")), label)


def test_demo_without_weights_says_how_to_get_a_model(demo, tmp_path, monkeypatch, caplog):
    """No --model, no MODEL.WEIGHTS, no --random-weights: exit code 2 and the way to get a model, no masks."""
    monkeypatch.chdir(tmp_path)  # no output/tiny_synthetic here
    out = tmp_path / "o.png"
    rc = demo.main(["--config-file", TINY, "--input", str(SAMPLE), "--output", str(out), "--task", "referring",
                    "--prompt", "the cup", "--opts", "MODEL.DEVICE", "cpu"])
    assert rc == 2 and not out.exists()
    text = caplog.text
    assert "No model weights given" in text and "tools/train_net.py --config-file configs/tiny/psalm_synthetic.yaml" in text
    assert "tools/convert_official.py" in text
    # a trained main-job model present: the message says which --model to pass
    (tmp_path / "output" / "tiny_synthetic").mkdir(parents=True)
    (tmp_path / "output" / "tiny_synthetic" / "model_final.pth").write_bytes(b"")
    caplog.clear()
    assert demo.main(["--config-file", TINY, "--input", str(SAMPLE), "--task", "referring", "--prompt", "x"]) == 2
    assert "pass --model output/tiny_synthetic" in caplog.text


def test_demo_model_dir_writes_overlay_json_and_masks(demo, tmp_path, psalm_cache):
    import json

    from .tiny_model_dir import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", psalm_cache)
    out = tmp_path / "out"
    rc = demo.main(["--model", str(model), "--input", str(SAMPLE), "--output", str(out), "--task", "panoptic",
                    "--classes", "cup, saucer", "table", "--stuff", "table"])
    assert rc == 0
    with Image.open(out / "sample.png") as im:
        assert im.size == (480, 320)
    record = json.loads((out / "sample.json").read_text())
    assert record["task"] == "panoptic" and record["masks_png"] == "sample_masks.png"
    ids = np.asarray(Image.open(out / "sample_masks.png"))
    assert ids.shape == (320, 480)
    assert set(np.unique(ids).tolist()) <= {0} | {s["id"] for s in record["segments"]}
    for seg in record["segments"]:
        assert seg["label"] in ("cup", "saucer", "table") and seg["isthing"] == (seg["label"] != "table")
        assert seg["area"] == int((ids == seg["id"]).sum())
    assert demo.main(["--model", str(model), "--config-file", TINY, "--input", str(SAMPLE)]) == 2
