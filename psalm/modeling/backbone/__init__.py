"""Vision backbones (registered in detectron2's ``BACKBONE_REGISTRY``)."""

from .swin import PSALMSwinTransformer

__all__ = ["PSALMSwinTransformer"]
