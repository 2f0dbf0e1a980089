"""PSALM model components. Importing this package registers them in their registries."""
from .backbone import PSALMSwinTransformer
from .pixel_decoder import PIXEL_DECODER_REGISTRY, MSDeformAttnPixelDecoder, build_pixel_decoder
from .projector import build_projector
from .transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    PSALMMultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)
from .meta_arch import PSALM, build_psalm_model
from . import extensions  # registers the research extensions (beyond the paper; selected by name)
