"""``ExtendedPSALM``: the PSALM meta-architecture with the research extensions (BEYOND THE PAPER).

Registered in detectron2's ``META_ARCH_REGISTRY``; selected with ``MODEL.META_ARCHITECTURE: "ExtendedPSALM"``,
options under ``MODEL.EXTENSIONS`` (``psalm.modeling.extensions``). Everything else is the official
:class:`~psalm.modeling.meta_arch.PSALM`; this subclass changes only:

* ``REFER_AS_CLASS``: sentence conditions go through ``class_projector`` (the model has no
  ``refer_projector``) and are scored by the decoder's ``class_head`` (:class:`ExtendedPSALMDecoder`), so what
  the category task learns about names serves referring. One set of weights, each under one state-dict name.
* ``HEAD_MASK_POOLING``: passes the named map (``mask_features`` or a backbone feature) to the decoder as
  ``pool_features``; the pooling itself is the decoder's.
* ``MATCH_WITH_SCORES``: trains with :class:`ScoreMatchingSetCriterion`.

The scoring-head options (pooling, shape grid, refer-as-class) need
``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME: "ExtendedPSALMDecoder"``; a config that sets them with another
decoder is refused when the model is built.
"""

from __future__ import annotations

from typing import Mapping

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ...config import extension_options_set
from ..meta_arch.psalm import PSALM, Conditions
from ..transformer_decoder import TRANSFORMER_DECODER_REGISTRY
from .decoder import ExtendedPSALMDecoder
from .matching import ScoreMatchingSetCriterion

__all__ = ["ExtendedPSALM"]

_DECODER_OPTIONS = ("HEAD_MASK_POOLING", "HEAD_MASK_SHAPE_GRID", "REFER_AS_CLASS")


@META_ARCH_REGISTRY.register()
class ExtendedPSALM(PSALM):
    """:class:`PSALM` with the options of ``MODEL.EXTENSIONS`` (module docstring)."""

    @configurable
    def __init__(self, *, refer_as_class: bool = False, head_pool_source: str = "", **kwargs):
        """``kwargs``: :class:`PSALM`'s arguments. ``refer_as_class``: sentences through ``class_projector``
        (no ``refer_projector``); ``head_pool_source``: ``""``, ``"mask_features"`` or a backbone feature, the
        map given to the predictor as ``pool_features``."""
        super().__init__(**kwargs)
        self.refer_as_class = bool(refer_as_class)
        self.head_pool_source = head_pool_source
        if self.refer_as_class:
            del self.refer_projector  # sentences use class_projector: no unused (or aliased) parameters

    @classmethod
    def check_extension_options(cls, cfg) -> None:
        """At least one extension on, and the scoring-head options only with :class:`ExtendedPSALMDecoder`."""
        options = extension_options_set(cfg)
        if not options:
            raise ValueError(
                "MODEL.META_ARCHITECTURE 'ExtendedPSALM' with no MODEL.EXTENSIONS option on is the official model: "
                "select MODEL.META_ARCHITECTURE 'PSALM'"
            )
        name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
        decoder_options = [k for k in options if k in _DECODER_OPTIONS]
        if decoder_options and not issubclass(TRANSFORMER_DECODER_REGISTRY.get(name), ExtendedPSALMDecoder):
            raise ValueError(
                f"MODEL.EXTENSIONS.{{{', '.join(decoder_options)}}} change the scoring heads, which "
                f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME={name!r} does not read: select 'ExtendedPSALMDecoder'"
            )

    @classmethod
    def from_config(cls, cfg, device=None, tokenizer=None):
        ret = super().from_config(cfg, device=device, tokenizer=tokenizer)
        ext = cfg.MODEL.EXTENSIONS
        ret["refer_as_class"] = ext.REFER_AS_CLASS
        ret["head_pool_source"] = ext.HEAD_MASK_POOLING
        if ext.MATCH_WITH_SCORES:
            ret["criterion"] = ScoreMatchingSetCriterion(cfg)
        return ret

    def sentence_projector(self) -> nn.Module:
        return self.class_projector if self.refer_as_class else self.refer_projector

    def run_predictor(self, image_features: Mapping, cond: Conditions) -> dict:
        if not self.head_pool_source:
            return super().run_predictor(image_features, cond)
        if self.head_pool_source == "mask_features":
            pool = image_features["mask_features"]
        else:
            pool = image_features["features"][self.head_pool_source]
        return self.predictor(
            image_features["multi_scale_features"],
            image_features["mask_features"],
            cond.queries,
            cond.refer,
            cond.classes,
            cond.regions,
            pool_features=pool,
        )
