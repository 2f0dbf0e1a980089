"""Mask decoders (``TRANSFORMER_DECODER_REGISTRY``) and their positional encoding."""

from .position_encoding import PositionEmbeddingSine
from .psalm_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    PSALMMultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)

__all__ = [
    "PositionEmbeddingSine",
    "TRANSFORMER_DECODER_REGISTRY",
    "PSALMMultiScaleMaskedTransformerDecoder",
    "build_transformer_decoder",
]
