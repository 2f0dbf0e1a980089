"""Pixel-SAIL (arXiv 2504.10465) on psalm: ``import pixel_sail`` registers META_ARCH "PixelSAIL"."""
from .config import add_pixel_sail_config, get_pixel_sail_cfg  # noqa: F401
from .modeling import PixelSAIL  # noqa: F401  (registers META_ARCH_REGISTRY "PixelSAIL")
