"""Initialise PSALM's vision and mask-generation modules from a Mask2Former detectron2 ``.pkl``.

The official PSALM training starts from Mask2Former's Swin-B COCO-panoptic checkpoint
(``model_final_54b88a.pkl``) for the Swin, the pixel decoder and the decoder. detectron2 writes such
files as a pickled dict ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": ...}``.

``convert_mask2former_checkpoint(path)`` reads one and returns a :class:`~psalm.checkpoint.vision_keys.KeyConversion`
under our names (``backbone.*``, ``pixel_decoder.*``, ``predictor.*``), with every dropped source key
and every target key that the pkl lacks by design listed by name; ``load_mask2former_into(model, conv)``
loads it strictly into ``model.backbone`` / ``model.pixel_decoder`` / ``model.predictor``.

Only open pickles you trust: unpickling can run arbitrary code.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pickle
from typing import Iterable, Mapping

import numpy as np
import torch

from .strict import LoadReport, load_strict
from .vision_keys import (
    KeyConversion,
    mask2former_backbone_to_psalm,
    mask2former_pixel_decoder_to_psalm,
    mask2former_predictor_to_psalm,
)

logger = logging.getLogger(__name__)

__all__ = [
    "read_detectron2_pkl",
    "convert_mask2former_state_dict",
    "convert_mask2former_checkpoint",
    "load_mask2former_into",
    "MASK2FORMER_GROUPS",
]

# our module name -> Mask2Former prefix
MASK2FORMER_GROUPS = {
    "backbone": "backbone.",
    "pixel_decoder": "sem_seg_head.pixel_decoder.",
    "predictor": "sem_seg_head.predictor.",
}
_DROPPED_PREFIXES = {"criterion.": "training-loss buffer (SetCriterion.empty_weight), not a model weight"}


def read_detectron2_pkl(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``"model"`` dict of a detectron2 ``.pkl`` as torch tensors (names unchanged)."""
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict (detectron2 format), got {type(data).__name__}")
    model = data.get("model", data.get("blobs"))
    if not isinstance(model, dict):
        raise ValueError(f"{path}: no 'model' dict of arrays in this pickle (top-level keys: {sorted(data)[:10]})")
    out = {}
    for k, v in model.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
        elif isinstance(v, torch.Tensor):
            out[k] = v
        else:
            raise ValueError(f"{path}: value of {k!r} is a {type(v).__name__}, expected a numpy array")
    return out


def convert_mask2former_state_dict(
    sd: Mapping[str, torch.Tensor], *, num_queries: int | None = None, drop: Iterable[str] = ()
) -> KeyConversion:
    """Convert a Mask2Former state dict (pkl names) to ours.

    ``num_queries``: keep only the first rows of ``query_embed`` (e.g. 100 of a 200-query instance
    model); by default the table is kept as is. ``drop``: extra key patterns (exact or fnmatch) to
    drop on purpose, reported as such. Any other key outside the three groups is an error.
    """
    drop = list(drop)
    dropped, rest = {}, {}
    for k, v in sd.items():
        reason = next((why for p, why in _DROPPED_PREFIXES.items() if k.startswith(p)), None)
        if reason is None and any(k == p or fnmatch.fnmatchcase(k, p) for p in drop):
            reason = "dropped on request (drop pattern)"
        if reason is not None:
            dropped[k] = reason
        else:
            rest[k] = v
    unknown = sorted(k for k in rest if not any(k.startswith(p) for p in MASK2FORMER_GROUPS.values()))
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) belong to no known Mask2Former group ({', '.join(MASK2FORMER_GROUPS.values())}): "
            f"{unknown[:10]}. Is this a Mask2Former Swin checkpoint? Pass drop patterns to ignore them on purpose."
        )
    conv = KeyConversion({}, dropped)
    conv = conv.merge(mask2former_backbone_to_psalm(rest, MASK2FORMER_GROUPS["backbone"], "backbone."))
    conv = conv.merge(mask2former_pixel_decoder_to_psalm(rest, MASK2FORMER_GROUPS["pixel_decoder"], "pixel_decoder."))
    conv = conv.merge(
        mask2former_predictor_to_psalm(rest, MASK2FORMER_GROUPS["predictor"], "predictor.", num_queries=num_queries)
    )
    return conv


def convert_mask2former_checkpoint(
    path: str | os.PathLike, *, num_queries: int | None = None, drop: Iterable[str] = ()
) -> KeyConversion:
    """Read a detectron2 Mask2Former ``.pkl`` and convert it (see :func:`convert_mask2former_state_dict`)."""
    conv = convert_mask2former_state_dict(read_detectron2_pkl(path), num_queries=num_queries, drop=drop)
    logger.info("Converted Mask2Former checkpoint %s:\n%s", path, conv.format())
    return conv


def _strip(keys_or_sd, prefix: str):
    if isinstance(keys_or_sd, Mapping):
        return {k[len(prefix) :]: v for k, v in keys_or_sd.items() if k.startswith(prefix)}
    return [k[len(prefix) :] for k in keys_or_sd if k.startswith(prefix)]


def load_mask2former_into(model: torch.nn.Module, conversion: KeyConversion) -> dict[str, LoadReport]:
    """Load a converted checkpoint strictly into ``model.backbone``, ``model.pixel_decoder``, ``model.predictor``.

    Each submodule must match its group exactly, except the keys in ``conversion.allowed_missing``
    (our FPN conv biases, the condition heads), which keep their initial values. Raises
    :class:`~psalm.checkpoint.strict.IncompatibleKeysError` with the full report otherwise.
    """
    reports = {}
    for name in MASK2FORMER_GROUPS:
        module = getattr(model, name, None)
        if module is None:
            raise AttributeError(f"{type(model).__name__} has no submodule {name!r} to load Mask2Former weights into")
        prefix = name + "."
        reports[name] = load_strict(
            module,
            _strip(conversion.state_dict, prefix),
            allow_missing=_strip(conversion.allowed_missing, prefix),
            what=f"Mask2Former {name}",
        )
    return reports
