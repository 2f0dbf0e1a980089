"""Predictor (registry-built model, strict weights, visual prompts) and the demo."""
import numpy as np
import pytest
import torch

from pixelsail_testing import PROJECT


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)


def test_predictor_needs_weights(tiny_cfg):
    from pixel_sail.predictor import PixelSAILPredictor

    with pytest.raises(ValueError, match="no Pixel-SAIL weights are published"):
        PixelSAILPredictor(tiny_cfg)


def test_predictor_text_and_visual_prompts(tiny_cfg, image, tmp_path):
    from pixel_sail.predictor import PixelSAILPredictor

    torch.manual_seed(0)
    pred = PixelSAILPredictor(tiny_cfg, allow_random_weights=True)
    torch.save({"model": pred.model.state_dict()}, tmp_path / "w.pth")
    cfg = tiny_cfg.clone()
    cfg.MODEL.WEIGHTS = str(tmp_path / "w.pth")
    torch.manual_seed(1)
    loaded = PixelSAILPredictor(cfg)
    for k, v in pred.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])
    r = loaded(image, text="the red circle")
    assert r["task"] == "referring" and r["masks"].shape[1:] == (40, 56) and r["masks"].dtype == bool
    assert r["masks"].shape[0] <= 1
    inp, regions = loaded.make_input(image, question="What is the category of the region marked by <Prompt1>?",
                                     boxes=[(30, 5, 55, 30), (0, 0, 20, 20)])
    assert len(regions) == 2 and inp["task"] == "chat"
    assert inp["vp_patch_masks"].shape == (2, *inp["grid_hw"])
    # the bigger box (prompt 0) comes first, the smaller one overwrites it
    assert inp["vp_ids"] == [0, 1]
    forced = loaded(image, question="Please segment the object left of <Prompt0>.", boxes=[(30, 5, 55, 30)],
                    task="vt_res")
    assert forced["task"] == "vt_res" and forced["masks"].shape[0] == 1  # forced "It is [SEG]." if needed
    with pytest.raises(ValueError, match="mentions <Prompt1>"):
        loaded(image, question="What is <Prompt1>?", boxes=[(0, 0, 10, 10)])
    with pytest.raises(ValueError, match="exactly one"):
        loaded(image)


def test_demo_draws(tiny_cfg, image, tmp_path, tiny_tokenizer_dir):
    import importlib.util

    from PIL import Image

    Image.fromarray(image).save(tmp_path / "in.png")
    spec = importlib.util.spec_from_file_location("pixel_sail_demo", PROJECT / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for extra in (["--text", "the circle"], ["--question", "What is <Prompt0>?", "--box", "0", "0", "20", "20"]):
        out = tmp_path / "out.png"
        demo.main(["--config-file", str(PROJECT / "configs/tiny/pixelsail_tiny.yaml"), "--input", str(tmp_path / "in.png"),
                   "--output", str(out), "--allow-random-weights", *extra, "MODEL.PIXEL_SAIL.TOKENIZER", tiny_tokenizer_dir])
        drawn = np.asarray(Image.open(out))
        assert drawn.shape[:2] == (40, 56)


def test_run_perbench_on_official_format_files(tiny_cfg, tmp_path, monkeypatch):
    """The PerBench runner on files written in the official JSON layouts (random model; METEOR mocked:
    nltk is optional)."""
    import json
    import sys
    import types

    from PIL import Image

    from pixel_sail.evaluation import run_perbench
    from pixel_sail.predictor import PixelSAILPredictor
    from psalm.data.visual_prompts import encode_rle

    def rle(m):
        r = encode_rle(m)
        return {"size": r["size"], "counts": r["counts"].decode() if isinstance(r["counts"], bytes) else r["counts"]}

    img = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "sa_1.jpg")
    m = np.zeros((32, 48), bool)
    m[4:12, 4:20] = True
    (tmp_path / "cap.json").write_text(json.dumps([{"image_name": "sa_1.jpg", "object_annotations": [
        {"segmentation": rle(m), "caption": "a patch"}]}]))
    (tmp_path / "mcq.json").write_text(json.dumps([{"image_name": "sa_1.jpg", "mcqs": [
        {"object": rle(m), "question": "Which? (A) x (B) y ", "answer": "A"}]}]))
    (tmp_path / "vres.json").write_text(json.dumps([{"image_name": "sa_1.jpg", "question": "Please segment what is near <o1>.",
                                                     "answer": "<o2>", "segmentations": {"<o1>": rle(m), "<o2>": rle(~m)}}]))
    fake = types.ModuleType("nltk.translate.meteor_score")
    fake.meteor_score = lambda refs, hyp: 0.25
    for mod in ("nltk", "nltk.translate"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    monkeypatch.setitem(sys.modules, "nltk.translate.meteor_score", fake)
    torch.manual_seed(0)
    pred = PixelSAILPredictor(tiny_cfg, allow_random_weights=True)
    res = run_perbench(pred, str(tmp_path), str(tmp_path / "cap.json"), str(tmp_path / "mcq.json"), str(tmp_path / "vres.json"))
    assert res["caption"] == {"METEOR": 25.0, "num_samples": 1}
    assert res["mcq"]["num_questions"] == 1
    assert res["vt_res"]["num_masks"] == 1 and 0.0 <= res["vt_res"]["cIoU"] <= 100.0
    assert "overall" in res
