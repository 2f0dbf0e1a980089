"""The single transformer: transformers' ``Qwen2ForCausalLM`` with multimodal rotary positions.

The rotary module of the Qwen2 model is replaced by transformers' ``Qwen2VLRotaryEmbedding`` with
``mrope_section = [0, d/4, d/4]`` (spec B1.1): given (t, h, w) position ids [3, B, L] it returns
cos / sin [B, L, d] whose frequency sections come from t, h and w, which Qwen2's own
``apply_rotary_pos_emb`` then applies -- the same function as the official
``apply_multimodal_rotary_pos_emb``. With 2-D ids (text only) all three rows are equal and this is
exactly Qwen2's RoPE. The 4-D attention mask is passed through untouched (transformers returns a
4-D mask as given).
"""
from __future__ import annotations

import copy
import json
import logging
import os

import torch

logger = logging.getLogger(__name__)

__all__ = ["qwen2_config_from_cfg", "build_qwen2_mrope", "install_mrope", "mrope_section_for", "additive_mask"]


def mrope_section_for(head_dim: int, section=()) -> list:
    """[0, d/4, d/4] (official) or the configured sections; they must sum to d/2."""
    sec = list(section) or [0, head_dim // 4, head_dim // 4]
    if len(sec) != 3 or sum(sec) != head_dim // 2:
        raise ValueError(f"MROPE_SECTION {sec} must have 3 entries summing to head_dim / 2 = {head_dim // 2}")
    return sec


def qwen2_config_from_cfg(cfg, vocab_size: int):
    """A ``Qwen2Config`` from ``MODEL.PIXEL_SAIL.LLM`` (random init) or from the local HF directory's
    config.json (pretrained init; a configured dimension that disagrees with it is an error)."""
    from transformers import Qwen2Config

    c = cfg.MODEL.PIXEL_SAIL.LLM
    dims = dict(hidden_size=c.HIDDEN_SIZE, intermediate_size=c.INTERMEDIATE_SIZE,
                num_hidden_layers=c.NUM_HIDDEN_LAYERS, num_attention_heads=c.NUM_ATTENTION_HEADS,
                num_key_value_heads=c.NUM_KEY_VALUE_HEADS)
    if c.INIT == "pretrained":
        path = os.path.join(c.NAME_OR_PATH, "config.json")
        if not c.NAME_OR_PATH or not os.path.isfile(path):
            raise FileNotFoundError(
                f"MODEL.PIXEL_SAIL.LLM.INIT='pretrained' needs NAME_OR_PATH = a local HF Qwen2.5 directory with "
                f"config.json (got {c.NAME_OR_PATH!r}); set INIT='random' to train from scratch")
        with open(path) as f:
            hf = json.load(f)
        theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta"))
        checks = dict(dims, rms_norm_eps=c.RMS_NORM_EPS, max_position_embeddings=c.MAX_POSITION_EMBEDDINGS,
                      tie_word_embeddings=c.TIE_WORD_EMBEDDINGS, vocab_size=c.VOCAB_SIZE or hf.get("vocab_size"))
        for k, v in checks.items():
            if k in hf and hf[k] != v:
                raise ValueError(f"MODEL.PIXEL_SAIL.LLM.{k.upper()}={v} but {path} has {k}={hf.get(k)}")
        if theta is not None and float(theta) != float(c.ROPE_THETA):
            raise ValueError(f"MODEL.PIXEL_SAIL.LLM.ROPE_THETA={c.ROPE_THETA} but {path} has rope_theta={theta}")
        config = Qwen2Config.from_pretrained(c.NAME_OR_PATH, local_files_only=True)
        # the embeddings are resized to the extended tokenizer after loading (build_qwen2_mrope)
    elif c.INIT in ("random", "checkpoint"):
        if c.VOCAB_SIZE and c.VOCAB_SIZE < vocab_size:
            raise ValueError(f"MODEL.PIXEL_SAIL.LLM.VOCAB_SIZE={c.VOCAB_SIZE} is smaller than the tokenizer "
                             f"({vocab_size} tokens with the Pixel-SAIL tokens); use 0 for the tokenizer's size")
        config = Qwen2Config(vocab_size=c.VOCAB_SIZE or vocab_size, rms_norm_eps=c.RMS_NORM_EPS,
                             max_position_embeddings=c.MAX_POSITION_EMBEDDINGS, tie_word_embeddings=c.TIE_WORD_EMBEDDINGS,
                             rope_parameters={"rope_type": "default", "rope_theta": c.ROPE_THETA}, **dims)
    else:
        raise ValueError(f"MODEL.PIXEL_SAIL.LLM.INIT must be 'pretrained', 'random' or 'checkpoint', got {c.INIT!r}")
    if c.INIT in ("random", "checkpoint") and vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens, LLM vocabulary {config.vocab_size}")
    config._attn_implementation = c.ATTN_IMPLEMENTATION
    return config


def install_mrope(model, section=()) -> list:
    """Replace ``model.model.rotary_emb`` (a ``Qwen2ForCausalLM``) by ``Qwen2VLRotaryEmbedding`` with
    the multimodal sections. Returns the sections."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sec = mrope_section_for(head_dim, section)
    rope_cfg = copy.deepcopy(config)
    params = dict(config.rope_parameters or {})
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"only the default RoPE type is supported with mRoPE, got {params}")
    rope_cfg.rope_parameters = {"rope_type": "default", "rope_theta": params.get("rope_theta", 1000000.0),
                                "mrope_section": sec}
    old = model.model.rotary_emb
    model.model.rotary_emb = Qwen2VLRotaryEmbedding(rope_cfg).to(old.inv_freq.device)
    if not torch.allclose(model.model.rotary_emb.inv_freq, old.inv_freq.float()):
        raise RuntimeError("Qwen2VLRotaryEmbedding frequencies differ from the Qwen2 model's")
    return sec


def build_qwen2_mrope(cfg, vocab_size: int):
    """``Qwen2ForCausalLM`` (random or from the local directory) with mRoPE installed."""
    from transformers import Qwen2ForCausalLM

    c = cfg.MODEL.PIXEL_SAIL.LLM
    config = qwen2_config_from_cfg(cfg, vocab_size)
    if c.INIT == "pretrained":
        model = Qwen2ForCausalLM.from_pretrained(c.NAME_OR_PATH, config=config, local_files_only=True,
                                                 dtype=torch.float32)
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            n = model.get_input_embeddings().weight.shape[0]
            model.resize_token_embeddings(vocab_size)
            logger.info("LLM embeddings resized from %d to %d rows (the added tokens start from their new "
                        "initialisation)", n, vocab_size)
        logger.info("LLM initialised from %s", c.NAME_OR_PATH)
    else:
        model = Qwen2ForCausalLM(config)
    install_mrope(model, c.MROPE_SECTION)
    if c.GRADIENT_CHECKPOINTING:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, 1, Lq, Lk] (True = attend) -> additive float mask (0 / dtype min), for eager and sdpa."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)
