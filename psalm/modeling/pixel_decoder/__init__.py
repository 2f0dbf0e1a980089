"""Pixel decoders (``PIXEL_DECODER_REGISTRY``) and multi-scale deformable attention."""

from .ms_deform_attn import MSDeformAttn
from .msdeformattn import PIXEL_DECODER_REGISTRY, MSDeformAttnPixelDecoder, build_pixel_decoder

__all__ = ["MSDeformAttn", "PIXEL_DECODER_REGISTRY", "MSDeformAttnPixelDecoder", "build_pixel_decoder"]
