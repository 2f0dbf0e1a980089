"""Fixtures for the Pixel-SAIL tests: the tiny config (spec B6) with psalm's tiny tokenizer."""
import pytest
import torch

from pixelsail_testing import PROJECT, TINY_CONFIG  # noqa: F401  (a module name of its own: "conftest" is ambiguous)


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
