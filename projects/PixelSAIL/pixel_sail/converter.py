"""Strict converter for the authors' training checkpoints (spec B4; xtuner / mmengine ``.pth``).

Source layout (``bytedance/Sa2VA@9832e1a:sa2va_eval/projects/ST/models/sa2va_ST.py`` module tree, inferred):
a torch file holding the state dict directly or under ``state_dict`` / ``module`` / ``model`` (a
DeepSpeed ``module.`` prefix is stripped), with keys

=========================================================  ===============================================
authors                                                    ours (``PixelSAIL``)
=========================================================  ===============================================
``single_transformer.model.vis_embed.weight`` [D, 3p^2]     ``vis_embed.weight``
``single_transformer.model.vp_embed.weight`` [D, D]         ``vp_embed.weight``
``single_transformer.model.<rest>``                         ``llm.model.<rest>`` (Qwen2 names)
``single_transformer.lm_head.weight``                       ``llm.lm_head.weight``
``seg_token_projector.*``, ``image_feature_pre_projector.*``, ``mask_head.<same>``
``upsample_blocks.*``, ``image_feature_projector.*``
``mask2former_distill_linear.*``, ``sam2_distill_linear.*``  ``distiller.<same>`` when the model distils,
                                                           else dropped (training-only; the authors drop
                                                           them from saved state dicts too)
``radio_distill_linear.*``                                  dropped (unused teacher adapter)
=========================================================  ===============================================

Any other key, a missing key or a shape that differs from the model is an error listing every problem
(``IncompatibleKeysError``). ``llm.lm_head.weight`` may be absent when the LLM ties it to the
embeddings. ``rotary_emb.inv_freq`` buffers are never in the files (non-persistent).
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

import torch

from psalm.checkpoint.strict import check_state_dict, IncompatibleKeysError, load_strict
from psalm.checkpoint.vision_keys import KeyConversion

logger = logging.getLogger(__name__)

__all__ = ["read_official_checkpoint", "official_to_pixel_sail", "load_official_checkpoint", "HEAD_PREFIXES"]

HEAD_PREFIXES = ("seg_token_projector.", "image_feature_pre_projector.", "upsample_blocks.", "image_feature_projector.")
DISTILL_PREFIXES = ("mask2former_distill_linear.", "sam2_distill_linear.")
DROP_PREFIXES = {"radio_distill_linear.": "RADIO distillation adapter (training only, unused in the paper)"}


def read_official_checkpoint(path: str) -> dict:
    """The state dict of an authors' ``.pth`` (plain, ``state_dict``, ``module`` or ``model`` wrapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors (keys {list(obj)[:5] if isinstance(obj, dict) else type(obj)})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def official_to_pixel_sail(sd: Mapping[str, torch.Tensor], keep_distill: bool = False) -> KeyConversion:
    """Rename (no tensor is changed). Keys of no known group are returned unconverted under their own name
    so that the strict check reports them as unexpected."""
    out, dropped = {}, {}
    for k, v in sd.items():
        if k in ("single_transformer.model.vis_embed.weight", "single_transformer.model.vp_embed.weight"):
            out[k.split(".")[-2] + ".weight"] = v
        elif k.startswith("single_transformer.model."):
            out["llm.model." + k[len("single_transformer.model."):]] = v
        elif k.startswith("single_transformer.lm_head."):
            out["llm.lm_head." + k[len("single_transformer.lm_head."):]] = v
        elif k.startswith(HEAD_PREFIXES):
            out["mask_head." + k] = v
        elif k.startswith(DISTILL_PREFIXES):
            if keep_distill:
                out["distiller." + k] = v
            else:
                dropped[k] = "distillation adapter (training only; this model does not distil)"
        elif k.startswith(tuple(DROP_PREFIXES)):
            dropped[k] = next(why for p, why in DROP_PREFIXES.items() if k.startswith(p))
        else:
            out[k] = v  # unknown: reported as unexpected by the strict load
    return KeyConversion(out, dropped)


def load_official_checkpoint(model, path_or_state_dict, what: Optional[str] = None) -> KeyConversion:
    """Convert and load strictly into a :class:`pixel_sail.modeling.PixelSAIL` (raises with the full report)."""
    sd = read_official_checkpoint(path_or_state_dict) if isinstance(path_or_state_dict, str) else dict(path_or_state_dict)
    conv = official_to_pixel_sail(sd, keep_distill=getattr(model, "distiller", None) is not None)
    allow_missing = ["*rotary_emb.inv_freq", "*rotary_emb.original_inv_freq"]
    if getattr(model.llm.config, "tie_word_embeddings", False) and "llm.lm_head.weight" not in conv.state_dict:
        allow_missing.append("llm.lm_head.weight")
        conv.allowed_missing.append("llm.lm_head.weight")
    report = check_state_dict(model, conv.state_dict, allow_missing=allow_missing)
    if not report.ok:
        raise IncompatibleKeysError(report, what or "Pixel-SAIL official checkpoint")
    load_strict(model, conv.state_dict, allow_missing=allow_missing, what=what or "Pixel-SAIL official checkpoint")
    if "llm.lm_head.weight" in conv.allowed_missing:
        model.llm.tie_weights()
    logger.info("Loaded the authors' checkpoint: %s", conv.format())
    return conv
