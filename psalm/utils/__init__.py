"""User-facing helpers: image loading, visual-prompt parsing, prediction overlays, profiling.

``draw_prediction`` / ``region_colors`` (:mod:`psalm.utils.visualizer`, which imports matplotlib) are
loaded on first use, so importing the predictor does not pull in the plotting stack.
"""
from .image_io import load_image, read_image_rgb, to_rgb_uint8
from .prompts import RegionPrompt, parse_visual_prompts, rasterize_regions

__all__ = [
    "load_image",
    "read_image_rgb",
    "to_rgb_uint8",
    "RegionPrompt",
    "parse_visual_prompts",
    "rasterize_regions",
    "draw_prediction",
    "region_colors",
]


def __getattr__(name):
    if name in ("draw_prediction", "region_colors"):
        from . import visualizer

        return getattr(visualizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
