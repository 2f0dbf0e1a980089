"""The official PSALM release (HF-style directory) -> a checkpoint of our PSALM meta-architecture.

The release (``EnmingZhang/PSALM``) is a transformers directory: ``config.json`` (``model_type``
``llava_phi``: a ``PhiConfig`` plus LLaVA/PSALM fields), ``model.safetensors`` or safetensors shards
with ``model.safetensors.index.json``, and the tokenizer files (phi-1_5 + ``[PAD]`` + ``[SEG]``).

:func:`official_to_psalm` composes the per-module key conversions, each owned next to its module
(official prefix -> ours, converter):

* ``model.vision_tower.*`` -> ``backbone.*`` (``vision_keys.official_backbone_to_psalm``);
* ``model.mm_projector.*`` -> ``projector.*`` (``vision_keys.official_projector_to_psalm``);
* ``pixel_decoder.*`` -> ``pixel_decoder.*`` (``vision_keys.official_pixel_decoder_to_psalm``);
* ``predictor.*`` -> ``predictor.*`` (``vision_keys.official_predictor_to_psalm``);
* ``model.{embed_tokens,layers,final_layernorm}.*``, ``lm_head.*`` -> ``llm.*``, fused
  ``query_key_value`` split into q/k/v (``phi_keys.official_llm_to_psalm``);
* ``seg_query`` and the four condition projectors -> ``mask_tokens``, ``mask_token_projector``,
  ``class_projector``, ``refer_projector``, ``region_projector``
  (``phi_keys.official_language_heads_to_psalm``).

Dropped by name, with the reason logged: the Swin ``relative_position_index`` buffers (checked equal
to the standard index, recomputed by our Swin), ``predictor.query_feat`` / ``predictor.SEG_query_embed``
(dead parameters) and ``lm_head.bias`` if present. A source key that no converter claims is kept
under its own name, so that the strict check reports it as unexpected. :func:`convert_official_release`
then compares the result with a PSALM built from the config on the ``meta`` device and refuses to
write anything unless every key and shape matches (full report otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Mapping

import torch
from detectron2.modeling import META_ARCH_REGISTRY

from .phi_keys import (
    OFFICIAL_LANGUAGE_HEADS,
    official_language_heads_to_psalm,
    official_llm_to_psalm,
    read_hf_phi_dir,
)
from .strict import IncompatibleKeysError, LoadReport, check_state_dict
from .vision_keys import (
    KeyConversion,
    official_backbone_to_psalm,
    official_pixel_decoder_to_psalm,
    official_predictor_to_psalm,
    official_projector_to_psalm,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TOKENIZER_FILES",
    "official_to_psalm",
    "cfg_from_official_release",
    "read_official_release",
    "ConversionResult",
    "convert_official_release",
]

# Tokenizer files an HF directory may hold (copied verbatim next to the converted checkpoint).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)

_VISION_GROUPS = (
    ("model.vision_tower.", official_backbone_to_psalm),
    ("model.mm_projector.", official_projector_to_psalm),
    ("pixel_decoder.", official_pixel_decoder_to_psalm),
    ("predictor.", official_predictor_to_psalm),
)

# config.json field -> MODEL.PSALM.LLM key
_LLM_FIELDS = {
    "vocab_size": "VOCAB_SIZE",
    "hidden_size": "HIDDEN_SIZE",
    "intermediate_size": "INTERMEDIATE_SIZE",
    "num_hidden_layers": "NUM_HIDDEN_LAYERS",
    "num_attention_heads": "NUM_ATTENTION_HEADS",
    "partial_rotary_factor": "PARTIAL_ROTARY_FACTOR",
    "rope_theta": "ROPE_THETA",
    "max_position_embeddings": "MAX_POSITION_EMBEDDINGS",
    "hidden_act": "HIDDEN_ACT",
    "layer_norm_eps": "LAYER_NORM_EPS",
}


def read_official_release(path: str | pathlib.Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with official names, ``config.json`` dict) of a release directory.

    Weights: ``model.safetensors``, ``model.safetensors.index.json`` + shards, or ``pytorch_model.bin``.
    """
    return read_hf_phi_dir(path)


def official_to_psalm(sd: Mapping[str, torch.Tensor], num_attention_heads: int) -> KeyConversion:
    """Official PSALM state dict -> our key names (see the module docstring).

    Args:
        sd: the official state dict (e.g. from :func:`read_official_release`).
        num_attention_heads: Phi heads, needed to split the fused ``query_key_value``.
    Returns:
        :class:`KeyConversion` with our state dict, the dropped source keys (with reasons) and the
        target keys absent by design. Unclaimed source keys are passed through unchanged.
    """
    result = KeyConversion({})
    claimed: set[str] = set()
    for prefix, convert in _VISION_GROUPS:
        if any(k.startswith(prefix) for k in sd):
            result = result.merge(convert(sd, src_prefix=prefix))
            claimed.update(k for k in sd if k.startswith(prefix))
        else:
            logger.warning("official state dict has no %s* keys", prefix)
    llm = official_llm_to_psalm(sd, num_attention_heads, dst_prefix="llm.")
    result = result.merge(llm)
    claimed.update(
        k for k in sd if k.startswith(("model.embed_tokens.", "model.layers.", "model.final_layernorm.", "lm_head."))
    )
    heads = official_language_heads_to_psalm(sd)
    result = result.merge(heads)
    heads_src = set(OFFICIAL_LANGUAGE_HEADS.values())
    claimed.update(k for k in sd if k in heads_src or k.split(".", 1)[0] in heads_src)
    unclaimed = sorted(k for k in sd if k not in claimed)
    if unclaimed:
        logger.warning("%d official key(s) no converter knows (kept unchanged): %s", len(unclaimed), unclaimed[:10])
        leftover = KeyConversion({k: sd[k] for k in unclaimed})
        result = result.merge(leftover)
    return result


def _structure_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Config values that only the weights tell (shape-derived), as config-key -> value."""
    out: dict[str, object] = {}
    if "seg_query" in sd:
        out["MODEL.PSALM.NUM_MASK_TOKENS"] = int(sd["seg_query"].shape[0])
    if "predictor.query_embed.weight" in sd:
        queries = int(sd["predictor.query_embed.weight"].shape[0])
        out["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"] = queries
        # the official inference keeps the top NUM_OBJECT_QUERIES instances (test_topk_per_image = num_queries)
        out["MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE"] = queries
    fc = sd.get("model.mm_projector.fc.weight")
    if fc is not None and "model.mm_projector.layer1.0.conv1.weight" in sd:
        out["MODEL.PSALM.PROJECTOR.MID_DIM"] = int(fc.shape[1])
    return out


def cfg_from_official_release(cfg, config: Mapping, sd: Mapping[str, torch.Tensor] | None = None):
    """Set the config values the release determines (in place; returns ``cfg``).

    From ``config.json``: the Phi architecture (``MODEL.PSALM.LLM.*``: vocab size, hidden size,
    layers, heads, rotary, ...) and the projector type (``mm_projector_type``). From the weights,
    when given: the number of mask tokens / queries and the projector width. Every value that
    changes is logged (``TEST.DETECTIONS_PER_IMAGE`` follows the number of queries, the official top-k);
    a config whose other dimensions do not match the weights is caught later
    by the strict key/shape check.
    """
    if config.get("model_type") not in (None, "llava_phi", "phi"):
        raise ValueError(f"config.json model_type is {config.get('model_type')!r}; expected 'llava_phi' (PSALM)")
    updates: dict[str, object] = {}
    for field, key in _LLM_FIELDS.items():
        value = config.get(field)
        if value is None and field in ("partial_rotary_factor", "rope_theta"):
            value = (config.get("rope_parameters") or {}).get(field)
        if value is not None:
            updates[f"MODEL.PSALM.LLM.{key}"] = value
    projector = config.get("mm_projector_type")
    if projector is not None:
        if projector not in ("swin_conv", "linear"):
            raise ValueError(f"config.json mm_projector_type={projector!r} is not supported (swin_conv, linear)")
        updates["MODEL.PSALM.PROJECTOR.NAME"] = projector
    if config.get("projector_mid_dim") is not None:
        updates["MODEL.PSALM.PROJECTOR.MID_DIM"] = int(config["projector_mid_dim"])
    if sd is not None:
        updates.update(_structure_from_state_dict(sd))

    was_frozen = cfg.is_frozen()
    cfg.defrost()
    for key, value in updates.items():
        node, leaf = cfg, key.split(".")
        for part in leaf[:-1]:
            node = node[part]
        old = node[leaf[-1]]
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        if old != value:
            logger.info("%s: %r -> %r (from the release)", key, old, value)
        node[leaf[-1]] = value
    if was_frozen:
        cfg.freeze()
    return cfg


@dataclasses.dataclass
class ConversionResult:
    """What :func:`convert_official_release` wrote."""

    checkpoint: pathlib.Path  # torch file {"model": state_dict}, loadable with DetectionCheckpointer
    config: pathlib.Path  # YAML config matching the checkpoint (MODEL.WEIGHTS / TOKENIZER set)
    tokenizer_dir: pathlib.Path | None
    report: LoadReport
    dropped: dict[str, str]


def convert_official_release(
    release_dir: str | pathlib.Path,
    output_dir: str | pathlib.Path,
    cfg,
    checkpoint_name: str = "model_final.pth",
) -> ConversionResult:
    """Convert an official PSALM release directory into ``output_dir``.

    Writes ``output_dir/<checkpoint_name>`` (``{"model": state_dict}``, fp32 as stored in the
    release is kept per tensor), ``output_dir/config.yaml`` and the tokenizer files (copied verbatim).

    Args:
        release_dir: the HF-style release directory.
        output_dir: created if needed.
        cfg: a PSALM config (``psalm.config.get_psalm_cfg``) describing the model; the values the
            release determines are overwritten from it (:func:`cfg_from_official_release`).
    Raises:
        IncompatibleKeysError: with the full missing / unexpected / mis-shaped report, before
            anything is written, when the converted weights do not match a PSALM built from ``cfg``.
    """
    release_dir, output_dir = pathlib.Path(release_dir), pathlib.Path(output_dir)
    sd, config = read_official_release(release_dir)
    cfg = cfg.clone()
    cfg_from_official_release(cfg, config, sd)
    conv = official_to_psalm(sd, int(cfg.MODEL.PSALM.LLM.NUM_ATTENTION_HEADS))
    for key, why in sorted(conv.dropped.items()):
        logger.info("dropped %s: %s", key, why)

    # the structure to check against, through detectron2's registry (``import psalm`` registers the model):
    # the checkpoint layer does not import the modeling code
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg, device="meta")
    report = check_state_dict(model, conv.state_dict, allow_missing=conv.allowed_missing)
    if not report.ok:
        raise IncompatibleKeysError(report, f"converted official release {release_dir}")
    logger.info("converted %d keys; %s", len(conv.state_dict), report.format())

    output_dir.mkdir(parents=True, exist_ok=True)
    tok_files = [f for f in TOKENIZER_FILES if (release_dir / f).is_file()]
    tokenizer_dir = None
    if tok_files:
        for f in tok_files:
            shutil.copyfile(release_dir / f, output_dir / f)
        tokenizer_dir = output_dir
    else:
        logger.warning("%s has no tokenizer files; set MODEL.PSALM.TOKENIZER yourself", release_dir)

    ckpt = output_dir / checkpoint_name
    state = {k: v.contiguous() for k, v in conv.state_dict.items()}
    torch.save({"model": state, "__author__": "psalm.checkpoint.official"}, ckpt)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(ckpt)
    if tokenizer_dir is not None:
        cfg.MODEL.PSALM.TOKENIZER = str(tokenizer_dir)
    cfg_file = output_dir / "config.yaml"
    cfg_file.write_text(cfg.dump())
    (output_dir / "conversion_report.json").write_text(
        json.dumps(
            {
                "release": str(release_dir),
                "num_keys": len(state),
                "dropped": conv.dropped,
                "allowed_missing": conv.allowed_missing,
            },
            indent=1,
        )
    )
    return ConversionResult(ckpt, cfg_file, tokenizer_dir, report, dict(conv.dropped))
