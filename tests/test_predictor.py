"""PSALMPredictor on the tiny model (CPU, random weights) with real images from scikit-image, plus the
user-input helpers it relies on (image conversion, visual-prompt parsing, overlays).

Random weights make the masks meaningless, so the model tests check what the API guarantees:
output structure, shapes at the ORIGINAL image size, dtypes, score ranges, consistency between
paths (single vs batch vs shared image features), and that every bad input raises the documented
error.
"""
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from psalm.config import get_psalm_cfg
from psalm.utils.image_io import load_image, read_image_rgb, to_rgb_uint8
from psalm.utils.prompts import masks_from_label_map, parse_visual_prompts, rasterize_regions
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


def test_label_map_objects():
    label = np.zeros((5, 5), np.uint8)
    label[0, 0], label[4, 4], label[2, 2] = 1, 3, 255
    ids, masks = masks_from_label_map(label)
    assert ids == [1, 3] and masks.shape == (2, 5, 5) and masks[1][4, 4] and masks.sum() == 2
    with pytest.raises(ValueError, match="no object"):
        masks_from_label_map(np.zeros((5, 5), np.uint8))


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
