"""PixelLM (CVPR 2024) on the psalm library: ``import pixellm`` registers the meta-architecture
``"PixelLM"`` (detectron2 ``META_ARCH_REGISTRY``) and the project's data sets."""
from .config import add_pixellm_config, get_pixellm_cfg
from .modeling import PixelLM

__all__ = ["add_pixellm_config", "get_pixellm_cfg", "PixelLM"]
