"""PSALMPredictor on the tiny model (CPU, random weights) with real images from scikit-image, plus the
user-input helpers it relies on (image conversion, visual-prompt parsing, overlays).

Random weights make the masks meaningless, so the model tests check what the API guarantees:
output structure, shapes at the ORIGINAL image size, dtypes, score ranges, consistency between
paths (single vs batch vs shared image features), and that every bad input raises the documented
error.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from psalm.config import get_psalm_cfg
from psalm.utils.image_io import load_image, read_image_rgb, to_rgb_uint8
from psalm.utils.prompts import parse_visual_prompts, rasterize_regions
from psalm.utils.visualizer import draw_prediction

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")


# ----------------------------------------------------------------------------------- image conversion
def test_image_conversions_to_rgb_uint8():
    rgb = skdata.chelsea()  # (300, 451, 3) uint8
    assert to_rgb_uint8(rgb) is not None and np.array_equal(to_rgb_uint8(rgb), rgb)
    gray = skdata.camera()  # (512, 512) uint8
    out = to_rgb_uint8(gray)
    assert out.shape == (512, 512, 3) and np.array_equal(out[..., 1], gray)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    assert np.array_equal(to_rgb_uint8(rgba), rgb)
    sixteen = rgb.astype(np.uint16) * 257  # exact 16-bit version of the 8-bit image
    assert np.array_equal(to_rgb_uint8(sixteen), rgb)
    assert np.array_equal(to_rgb_uint8(rgb / 255.0), rgb)
    pil_la = Image.fromarray(gray).convert("LA")
    assert np.array_equal(load_image(pil_la)[..., 0], gray)


def test_image_files(tmp_path):
    gray16 = (skdata.camera().astype(np.uint16) * 257)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image_rgb(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (512, 512, 3)
    assert np.array_equal(out[..., 2], skdata.camera())
    Image.fromarray(skdata.coffee()).convert("P").save(tmp_path / "pal.png")
    assert read_image_rgb(tmp_path / "pal.png").shape == (400, 600, 3)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((3, 8, 8), np.uint8), "channel-first"),
        (np.zeros((8, 8, 2), np.uint8), r"\[H, W\]"),
        (np.zeros((8, 8, 3), bool), "bool"),
        (np.full((8, 8, 3), 2.0), r"\[0, 1\]"),
        (np.full((8, 8, 3), -1, np.int32), "0..65535"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        ([[1, 2], [3, 4]], "unsupported image type"),
    ],
)
def test_bad_image_arrays(bad, match):
    with pytest.raises(ValueError, match=match):
        load_image(bad)


def test_bad_image_files(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(ValueError, match="cannot read .* as an image"):
        load_image(str(text))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")


# ----------------------------------------------------------------------------------- visual prompts
def test_visual_prompts_parse_and_rasterize():
    hw = (40, 60)
    regions = parse_visual_prompts(
        hw,
        points=[(10, 5), [(30, 20), (50, 30)]],
        scribbles=[[(1, 1), (20, 1), (20, 30)]],
        boxes=[(-10, -10, 5.5, 4.2)],  # partly outside: clipped
        masks=[np.pad(np.ones((4, 4), np.uint8), ((0, 36), (0, 56)))],
    )
    assert [r.kind for r in regions] == ["point", "point", "scribble", "box", "mask"]
    np.testing.assert_allclose(regions[3].data, [0, 0, 5.5, 4.2])
    masks = rasterize_regions(regions, hw, point_radius=2, scribble_radius=0)
    assert masks.shape == (5, 40, 60) and masks.dtype == bool
    # point (x=10, y=5) -> a radius-2 disk (13 pixels) centred at row 5, col 10
    assert masks[0].sum() == 13 and masks[0][5, 10] and not masks[0][5, 13]
    assert masks[1][20, 30] and masks[1][30, 50] and not masks[1][25, 40]
    # 1-pixel polyline through its vertices (radius 0)
    assert masks[2][1, 1] and masks[2][1, 20] and masks[2][30, 20] and masks[2].sum() == 20 + 29
    assert masks[3].sum() == 6 * 5 and masks[3][4, 5]  # rows 0..4, cols 0..5
    assert masks[4].sum() == 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "at least one visual prompt"),
        ({"points": [(60, 5)]}, "outside the 60x40"),
        ({"points": [(-1, 5)]}, "outside"),
        ({"points": [(1, 2, 3)]}, r"\(x, y\)"),
        ({"points": [(float("nan"), 1)]}, "finite"),
        ({"scribbles": [[(1, 1), (1, 45)]]}, "outside"),
        ({"boxes": [(10, 10, 5, 20)]}, "x1 > x0"),
        ({"boxes": [(100, 100, 200, 200)]}, "does not overlap"),
        ({"boxes": [(1, 2, 3)]}, "4 finite numbers"),
        ({"masks": [np.zeros((40, 60), bool)]}, "no foreground"),
        ({"masks": [np.ones((41, 60), bool)]}, "original image size"),
        ({"points": "10,10"}, "must be a list"),
    ],
)
def test_bad_visual_prompts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        parse_visual_prompts((40, 60), **kwargs)


# ----------------------------------------------------------------------------------- overlays
def test_draw_prediction_every_output_kind():
    from detectron2.structures import Instances

    image = skdata.chelsea()
    h, w = image.shape[:2]
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, :100], masks[1, 150:] = True, True
    inst = Instances((h, w), pred_masks=masks, scores=torch.tensor([0.9, 0.3]), pred_classes=torch.tensor([1, 0]))
    pan = torch.zeros(h, w, dtype=torch.int32)
    pan[:100], pan[150:] = 1, 2
    segments = [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 1}]
    regions = parse_visual_prompts((h, w), points=[(20, 20)], boxes=[(200, 160, 400, 290)])
    cases = [
        ("panoptic", {"panoptic_seg": (pan, segments)}, {"class_names": ["cat", "floor"]}),
        ("instance", {"instances": inst}, {"class_names": ["cat", "floor"]}),
        ("semantic", {"sem_seg": torch.rand(2, h, w)}, {"class_names": ["cat", "floor"]}),
        ("referring", {"instances": inst[:1]}, {"sentence": "the cat"}),
        ("gres", {"instances": inst[:0], "no_target": True}, {"sentence": "the dog"}),
        ("interactive", {"instances": inst}, {"regions": regions}),
        ("instruction", {"text": "A cat."}, {}),
    ]
    for task, prediction, kwargs in cases:
        out = draw_prediction(image, prediction, task, **kwargs)
        assert out.shape == image.shape and out.dtype == np.uint8, task
        assert not np.array_equal(out, image), f"{task}: nothing was drawn"
    with pytest.raises(ValueError, match="must contain 'instances'"):
        draw_prediction(image, {"sem_seg": torch.rand(2, h, w)}, "referring")


# ----------------------------------------------------------------------------------- the predictor
@pytest.fixture(scope="session")
def psalm_cache(tmp_path_factory):
    """One tiny-tokenizer cache for the whole session (building it takes a few seconds)."""
    return str(tmp_path_factory.getbasetemp() / "psalm_cache")


def _tiny_cfg(cache, *opts):
    from psalm.predictor import ensure_tokenizer

    opts = ["MODEL.DEVICE", "cpu", "TEST.PSALM.MAX_NEW_TOKENS", "8", *opts]  # short chat answers: fast tests
    return ensure_tokenizer(get_psalm_cfg(TINY, opts), cache_dir=cache)


@pytest.fixture(scope="module")
def predictor(psalm_cache):
    from psalm.predictor import PSALMPredictor

    torch.manual_seed(0)
    return PSALMPredictor(_tiny_cfg(psalm_cache))


COFFEE = skdata.coffee()  # (400, 600, 3) uint8, CC0
CLASSES = ["cup", "saucer", "spoon", "table"]


def _check_instances(inst, n, hw):
    assert inst.image_size == hw
    assert inst.pred_masks.shape == (n, *hw) and inst.pred_masks.dtype == torch.bool
    assert inst.scores.shape == (n,) and bool(((inst.scores >= 0) & (inst.scores <= 1)).all())


def test_category_tasks(predictor):
    hw = COFFEE.shape[:2]
    out = predictor(COFFEE, task="panoptic", classes=CLASSES, is_thing=[True, True, True, False])
    pan, segments = out["panoptic_seg"]
    assert pan.shape == hw and pan.dtype == torch.int32
    assert {int(v) for v in pan.unique()} <= {0} | {s["id"] for s in segments}
    assert all(0 <= s["category_id"] < len(CLASSES) for s in segments)
    assert out["sem_seg"].shape == (len(CLASSES), *hw)
    assert all(int(c) != 3 for c in out["instances"].pred_classes)  # panoptic instances: things only

    inst = predictor(COFFEE, task="instance", classes=CLASSES)["instances"]
    _check_instances(inst, len(inst), hw)
    assert len(inst) > 0 and bool((inst.pred_classes < len(CLASSES)).all()) and inst.pred_boxes.tensor.shape == (len(inst), 4)

    sem = predictor(COFFEE, task="semantic", classes=["cup", "wooden table"])["sem_seg"]
    assert sem.shape == (2, *hw) and sem.dtype == torch.float32 and bool(torch.isfinite(sem).all())


def test_referring_and_gres(predictor):
    hw = COFFEE.shape[:2]
    _check_instances(predictor(COFFEE, task="referring", text="the white cup")["instances"], 1, hw)
    two = predictor(COFFEE, task="referring", text=["the cup", "white porcelain"])  # merged sentences
    _check_instances(two["instances"], 1, hw)
    gres = predictor(COFFEE, task="gres", text="all spoons")
    assert isinstance(gres["no_target"], bool)
    _check_instances(gres["instances"], 0 if gres["no_target"] else 1, hw)


def test_interactive_every_prompt_kind(predictor):
    hw = COFFEE.shape[:2]
    mask = np.zeros(hw, bool)
    mask[300:350, 50:120] = True
    out = predictor(
        COFFEE, task="interactive", points=[(240, 150), [(100, 60), (110, 70)]],
        scribbles=[[(400, 300), (450, 320), (500, 380)]], boxes=[(150, 40, 330, 260)], masks=[mask],
    )
    _check_instances(out["instances"], 5, hw)


def test_instruction(predictor):
    out = predictor(COFFEE, task="instruction", question="What is on the table?")
    assert set(out) == {"text"} and isinstance(out["text"], str)


def test_image_kinds_give_the_same_result(predictor, tmp_path):
    rgb = skdata.chelsea()
    path = tmp_path / "cat.png"
    Image.fromarray(rgb).save(path)
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    variants = [rgb, str(path), Image.fromarray(rgb), rgba, rgb.astype(np.uint16) * 257]
    scores = [predictor(v, task="referring", text="the cat")["instances"].scores for v in variants]
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0])
    gray = predictor(skdata.camera(), task="referring", text="the man")  # 2-d grayscale
    _check_instances(gray["instances"], 1, (512, 512))


def test_batch_equals_single_and_keeps_order(predictor):
    images = [COFFEE, skdata.chelsea(), skdata.astronaut()]
    prompts = [{"task": "referring", "text": "the cup"}, {"task": "instance", "classes": ["cat"]},
               {"task": "interactive", "points": [(250, 200)]}]
    batch = predictor.predict_batch(images, prompts=prompts, batch_size=2)
    for img, p, out in zip(images, prompts, batch):
        p = dict(p)
        single = predictor(img, p.pop("task"), **p)
        assert out["instances"].image_size == img.shape[:2]
        torch.testing.assert_close(out["instances"].scores, single["instances"].scores, atol=1e-5, rtol=1e-4)
    shared = predictor.predict_batch([COFFEE, COFFEE], task="referring", text="the cup")
    torch.testing.assert_close(shared[0]["instances"].scores, shared[1]["instances"].scores)


def test_prompts_share_one_image_encoding(predictor):
    calls = []
    handle = predictor.model.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        prompts = [{"task": "referring", "text": "the cup"}, {"task": "interactive", "points": [(240, 150)]},
                   {"task": "panoptic", "classes": CLASSES}, {"task": "referring", "text": "the spoon"}]
        outs = predictor.predict_prompts(COFFEE, prompts)
        assert len(calls) == 1, f"the backbone ran {len(calls)} times for one image"
    finally:
        handle.remove()
    assert "panoptic_seg" in outs[2] and len(outs) == 4
    for p, out in zip(prompts, outs):
        if p["task"] == "panoptic":
            continue
        p = dict(p)
        single = predictor(COFFEE, p.pop("task"), **p)
        torch.testing.assert_close(out["instances"].scores, single["instances"].scores, atol=1e-5, rtol=1e-4)


def test_tiny_region_survives_resize(predictor):
    mask = np.zeros(COFFEE.shape[:2], bool)
    mask[201, 301] = True  # one pixel; the 600 -> 256 nearest resize may drop it
    inp = predictor.make_input(COFFEE, "interactive", masks=[mask])
    assert inp["region_masks"].shape == (1, 256, 256) and int(inp["region_masks"].sum()) >= 1
    rows, cols = torch.nonzero(inp["region_masks"][0], as_tuple=True)
    assert abs(int(rows[0]) - 201 * 256 / 600) <= 1 and abs(int(cols[0]) - 301 * 256 / 600) <= 1


@pytest.mark.parametrize(
    "task, kwargs, match",
    [
        ("referring", {"text": ""}, "empty"),
        ("referring", {"text": "   "}, "empty"),
        ("referring", {"text": []}, "non-empty list"),
        ("referring", {}, "needs text"),
        ("panoptic", {"classes": []}, "non-empty list"),
        ("panoptic", {}, "needs classes"),
        ("instance", {"classes": ["cup", ""]}, r"classes\[1\]"),
        ("instance", {"classes": ["cup", "cup"]}, "duplicates"),
        ("semantic", {"classes": ["cup", "background"]}, "background"),
        ("panoptic", {"classes": ["cup"], "is_thing": [True, False]}, "is_thing"),
        ("referring", {"classes": ["cup"]}, "do not apply"),
        ("interactive", {}, "at least one visual prompt"),
        ("interactive", {"points": [(600, 10)]}, "outside the 600x400"),
        ("interactive", {"masks": [np.zeros((400, 600), bool)]}, "no foreground"),
        ("interactive", {"masks": [np.ones((300, 600), bool)]}, "original image size"),
        ("interactive", {"boxes": [(700, 500, 800, 600)]}, "does not overlap"),
        ("instruction", {"question": ""}, "non-empty"),
        ("panoptics", {"classes": ["cup"]}, "unknown task"),
        ("caption", {}, "not supported by the predictor"),
    ],
)
def test_bad_prompts_raise_value_error(predictor, task, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor(COFFEE, task=task, **kwargs)


def test_bad_images_and_batches_raise(predictor, tmp_path):
    bogus = tmp_path / "model.pth.jpg"
    bogus.write_bytes(b"\x00\x01 not an image")
    with pytest.raises(ValueError, match="cannot read"):
        predictor(str(bogus), task="referring", text="x")
    with pytest.raises(FileNotFoundError):
        predictor(tmp_path / "nope.png", task="referring", text="x")
    with pytest.raises(ValueError, match="one prompt dict per image|give one per image"):
        predictor.predict_batch([COFFEE, COFFEE], prompts=[{"task": "referring", "text": "x"}])
    with pytest.raises(ValueError, match="list of images"):
        predictor.predict_batch(COFFEE, task="referring", text="x")
    with pytest.raises(ValueError, match="empty"):
        predictor.predict_batch([], task="referring", text="x")


def test_device_and_dtype_resolution():
    from psalm.predictor import resolve_device, resolve_inference_dtype

    cpu = torch.device("cpu")
    assert resolve_inference_dtype("auto", cpu) is None and resolve_inference_dtype("fp32", cpu) is None
    assert resolve_inference_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_inference_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="TEST.PSALM.DTYPE"):
        resolve_inference_dtype("float8", cpu)
    with pytest.raises(ValueError, match="not a valid torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        assert resolve_inference_dtype("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)


def test_weights_load_and_bf16_autocast_on_cpu(predictor, psalm_cache, tmp_path):
    """MODEL.WEIGHTS goes through DetectionCheckpointer; the autocast path (GPU default) runs on CPU too."""
    from detectron2.checkpoint import DetectionCheckpointer

    from psalm.predictor import PSALMPredictor

    DetectionCheckpointer(predictor.model, save_dir=str(tmp_path)).save("tiny")
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = PSALMPredictor(_tiny_cfg(psalm_cache, "MODEL.WEIGHTS", str(tmp_path / "tiny.pth"), "TEST.PSALM.DTYPE", "bf16"))
    assert loaded.autocast_dtype == torch.bfloat16
    for name, tensor in predictor.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    ref = predictor(COFFEE, task="referring", text="the cup")["instances"]
    out = loaded(COFFEE, task="referring", text="the cup")["instances"]
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, ref.scores, atol=0.05, rtol=0)  # bf16 vs fp32 on the same weights


def test_video_propagation(predictor):
    frames = [COFFEE[i * 8 : i * 8 + 300, i * 10 : i * 10 + 400] for i in range(3)]
    first = np.zeros((2, 300, 400), bool)
    first[0, 50:150, 100:250] = True
    first[1, 200:280, 20:120] = True
    results = list(predictor.predict_video(frames, first))
    assert len(results) == 3
    np.testing.assert_array_equal(results[0].masks, first)
    np.testing.assert_array_equal(results[0].label_map, first[0] * 1 + first[1] * 2)
    for t, r in enumerate(results):
        assert r.frame_index == t and r.object_ids == [1, 2]
        assert r.masks.shape == (2, 300, 400) and r.label_map.shape == (300, 400)
        assert set(np.unique(r.label_map).tolist()) <= {0, 1, 2}
        assert r.scores.shape == (2,)
    assert [r.prompt_frame for r in results][:2] == [-1, 0]
    # a label map works as well and gives the same propagation
    label = (first[0] * 1 + first[1] * 2).astype(np.uint8)
    again = list(predictor.predict_video(frames, label))
    for a, b in zip(results, again):
        np.testing.assert_array_equal(a.label_map, b.label_map)
    with pytest.raises(ValueError, match="empty"):
        next(predictor.predict_video(frames, np.zeros((1, 300, 400), bool)))
    with pytest.raises(ValueError, match="must have the size"):
        list(predictor.predict_video([frames[0], COFFEE], first))


def test_incomplete_checkpoint_is_an_error(predictor, psalm_cache, tmp_path):
    sd = {k: v for k, v in predictor.model.state_dict().items() if not k.startswith("predictor.")}
    torch.save({"model": sd}, tmp_path / "partial.pth")
    from psalm.predictor import PSALMPredictor

    with pytest.raises(ValueError, match="missing or mis-shaped"):
        PSALMPredictor(_tiny_cfg(psalm_cache, "MODEL.WEIGHTS", str(tmp_path / "partial.pth")))


def test_test_tokenizer_only_where_asked(tmp_path, monkeypatch):
    """The tiny test tokenizer is written only into a directory the caller names (cache_dir or
    $PSALM_CACHE), never into the home directory as a side effect."""
    from psalm.predictor import ensure_tokenizer

    monkeypatch.delenv("PSALM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = get_psalm_cfg(TINY, ["MODEL.DEVICE", "cpu"])
    with pytest.raises(ValueError, match="PSALM_CACHE=DIR"):
        ensure_tokenizer(cfg)
    assert not (tmp_path / "home").exists()
    monkeypatch.setenv("PSALM_CACHE", str(tmp_path / "asked"))
    tok = ensure_tokenizer(cfg).MODEL.PSALM.TOKENIZER
    assert tok.startswith(str(tmp_path / "asked")) and (tmp_path / "asked").is_dir()
    assert not (tmp_path / "home").exists()
