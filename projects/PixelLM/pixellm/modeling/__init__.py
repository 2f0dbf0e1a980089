from .meta_arch import IMAGE_TOKEN_INDEX, PixelLM

__all__ = ["PixelLM", "IMAGE_TOKEN_INDEX"]
