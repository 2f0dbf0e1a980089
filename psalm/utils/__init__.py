"""User-facing helpers: image loading, visual-prompt parsing and prediction overlays."""
from .image_io import load_image, read_image_rgb, to_rgb_uint8
from .prompts import RegionPrompt, masks_from_label_map, parse_visual_prompts, rasterize_regions
from .visualizer import draw_prediction, region_colors

__all__ = [
    "load_image",
    "read_image_rgb",
    "to_rgb_uint8",
    "RegionPrompt",
    "parse_visual_prompts",
    "rasterize_regions",
    "masks_from_label_map",
    "draw_prediction",
    "region_colors",
]
