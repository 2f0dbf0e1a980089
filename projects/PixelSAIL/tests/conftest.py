"""Fixtures for the Pixel-SAIL tests: the tiny config (spec B6) with psalm's tiny tokenizer."""
import os
import pathlib
import sys

import numpy as np
import pytest
import torch

PROJECT = pathlib.Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

TINY_CONFIG = PROJECT / "configs" / "tiny" / "pixelsail_tiny.yaml"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from psalm.data.tokenizer import save_tiny_tokenizer

    return str(save_tiny_tokenizer(tmp_path_factory.mktemp("pixelsail_tok")))


@pytest.fixture
def tiny_cfg(tiny_tokenizer_dir):
    from pixel_sail import get_pixel_sail_cfg

    return get_pixel_sail_cfg(str(TINY_CONFIG), ["MODEL.PIXEL_SAIL.TOKENIZER", tiny_tokenizer_dir])


@pytest.fixture
def make_model(tiny_cfg):
    from pixel_sail import PixelSAIL

    def make(*opts, seed=0):
        cfg = tiny_cfg.clone()
        if opts:
            cfg.merge_from_list(list(opts))
        torch.manual_seed(seed)
        return PixelSAIL(cfg).eval()

    return make


def make_input(model, height=32, width=48, seed=0, **extra):
    """A mapped input for a random image (pixel_values at the official resize of a height x width image)."""
    from pixel_sail.patchify import preprocess_image

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    px = preprocess_image(img, model.patch_size, 128, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    p = model.patch_size
    inp = dict(pixel_values=px, grid_hw=(px.shape[1] // p, px.shape[2] // p), height=height, width=width,
               task="referring")
    inp.update(extra)
    return inp
