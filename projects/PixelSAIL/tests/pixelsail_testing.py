"""Helpers the Pixel-SAIL tests import by name (``from pixelsail_testing import ...``): a module name of
its own, since several ``conftest`` modules (psalm's, PixelLM's) share one test session."""
import pathlib
import sys

import numpy as np

PROJECT = pathlib.Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

TINY_CONFIG = PROJECT / "configs" / "tiny" / "pixelsail_tiny.yaml"


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
