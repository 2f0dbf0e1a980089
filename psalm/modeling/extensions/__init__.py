"""Research extensions: options BEYOND THE PAPER and the official PSALM code.

Nothing here is part of PSALM as published. The official model lives in ``psalm.modeling`` (meta-arch,
decoder, matcher, criterion) and never reads these options; each extension is a subclass registered by
name, selected by config, with its options under ``MODEL.EXTENSIONS`` (all off by default):

=========================================  ==========================================================
registered class                           options it reads
=========================================  ==========================================================
``ExtendedPSALM`` (META_ARCH_REGISTRY)      ``REFER_AS_CLASS`` (sentences through the category projector),
                                           ``MATCH_WITH_SCORES`` (builds :class:`ScoreMatchingSetCriterion`),
                                           ``HEAD_MASK_POOLING`` (passes the pooled map to the decoder)
``ExtendedPSALMDecoder``                   ``HEAD_MASK_POOLING``, ``HEAD_MASK_SHAPE_GRID`` (scoring-head
(TRANSFORMER_DECODER_REGISTRY)             inputs), ``REFER_AS_CLASS`` (sentences scored by ``class_head``)
=========================================  ==========================================================

A config turns them on with ``MODEL.META_ARCHITECTURE: "ExtendedPSALM"``, and, for the scoring-head options,
``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME: "ExtendedPSALMDecoder"`` (``configs/tiny/psalm_synthetic.yaml``).
Importing ``psalm.modeling`` registers them. docs/DESIGN.md ("Extensions beyond the paper") has the details.
"""

from .decoder import ExtendedPSALMDecoder, mask_shape_grid
from .matching import ScoreMatchingHungarianMatcher, ScoreMatchingSetCriterion, match_probs
from .meta_arch import ExtendedPSALM

__all__ = [
    "ExtendedPSALM",
    "ExtendedPSALMDecoder",
    "ScoreMatchingHungarianMatcher",
    "ScoreMatchingSetCriterion",
    "mask_shape_grid",
    "match_probs",
]
