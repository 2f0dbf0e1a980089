"""The language model (transformers' native ``PhiForCausalLM``) and its tokenizer.

* :func:`load_tokenizer` loads a local HF tokenizer directory and adds PSALM's two tokens exactly as
  the official ``train.py`` does: ``[PAD]`` as the pad special token if the tokenizer has no pad
  token, then ``[SEG]`` as an ordinary added token (phi-1_5: ``<|endoftext|>`` = 50256,
  ``[PAD]`` = 50295, ``[SEG]`` = 50296, 50297 entries). Nothing is downloaded.
* :func:`build_llm` builds ``PhiForCausalLM`` from ``cfg.MODEL.PSALM.LLM.*`` or from the
  ``config.json`` of the local directory ``MODEL.PSALM.LLM.NAME_OR_PATH``. The model is constructed
  on the ``meta`` device (no memory, no random init), then either the directory's weights are
  assigned (converted by :mod:`psalm.checkpoint.phi_keys`, vocabulary resized, loaded with
  :func:`psalm.checkpoint.load_strict`) or the parameters are allocated and initialised once.
  ``lm_head`` has no bias (official); attention is ``sdpa`` or ``eager``
  (``MODEL.PSALM.LLM.ATTN_IMPLEMENTATION``); gradient checkpointing and freezing are applied from
  the config.
* :func:`causal_lm_loss` is the LM (instruction) loss: next-token cross-entropy that applies
  ``lm_head`` only at the positions whose next token is a target, never at image tokens or prompts.

Vocabulary rules: the embedding has ``MODEL.PSALM.LLM.VOCAB_SIZE`` rows, which must be at least
``len(tokenizer)``. Loading phi-1_5 (51200 rows, 50295 real tokens) keeps the real rows, sets the
``[PAD]`` row to their mean (official ``smart_tokenizer_and_embedding_resize``) and draws the
``[SEG]`` row (and any spare rows) from N(0, 0.02) (:func:`tokenizer_vocab_plan`,
:func:`psalm.checkpoint.phi_keys.resize_vocab_rows`). A checkpoint that already has ``VOCAB_SIZE``
rows (an LLM trained with PSALM's vocabulary) is loaded as it is.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from psalm.data.prompt import IGNORE_INDEX
from psalm.data.tokenizer import (  # noqa: F401  (re-exported: the tokenizer is data-path code)
    EOS_TOKEN,
    REAL_VOCAB_MIN,
    build_tokenizer,
    check_tokenizer_matches_vocab,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EOS_TOKEN",
    "load_tokenizer",
    "build_tokenizer",
    "tokenizer_vocab_plan",
    "check_tokenizer_matches_vocab",
    "phi_config_from_cfg",
    "build_llm",
    "init_phi_weights_",
    "rebuild_rotary_buffers",
    "causal_lm_loss",
]


# cfg.MODEL.PSALM.LLM key -> PhiConfig attribute (rope fields live in config.rope_parameters)
_ARCH_FIELDS = {
    "HIDDEN_SIZE": "hidden_size",
    "INTERMEDIATE_SIZE": "intermediate_size",
    "NUM_HIDDEN_LAYERS": "num_hidden_layers",
    "NUM_ATTENTION_HEADS": "num_attention_heads",
    "MAX_POSITION_EMBEDDINGS": "max_position_embeddings",
    "HIDDEN_ACT": "hidden_act",
    "LAYER_NORM_EPS": "layer_norm_eps",
    "PARTIAL_ROTARY_FACTOR": "partial_rotary_factor",
    "ROPE_THETA": "rope_theta",
}


def tokenizer_vocab_plan(tokenizer, pad_token: str = "[PAD]", seg_token: str = "[SEG]") -> tuple[int, list[int]]:
    """Which embedding rows a base LLM checkpoint provides, for :func:`resize_vocab_rows`.

    Returns ``(num_base_tokens, mean_init_ids)``: the rows below ``num_base_tokens`` are the base
    tokenizer's and come from the checkpoint; PSALM's added tokens sit at and above it. The
    ``[PAD]`` row is mean-initialised (when the pad token is PSALM's ``[PAD]``), ``[SEG]`` randomly.
    """
    seg_id = tokenizer.convert_tokens_to_ids(seg_token)
    added = [seg_id]
    mean_ids = []
    if tokenizer.pad_token == pad_token:
        added.append(tokenizer.pad_token_id)
        mean_ids.append(tokenizer.pad_token_id)
    base = min(added)
    if max(added) != len(tokenizer) - 1:
        raise ValueError(
            f"{seg_token}/{pad_token} are not the last tokens of the tokenizer (ids {sorted(added)}, "
            f"len {len(tokenizer)}); cannot tell which embedding rows a base checkpoint provides"
        )
    return base, mean_ids


# ---------------------------------------------------------------------------------------- model


def phi_config_from_cfg(cfg, hf_config: dict | None = None):
    """``PhiConfig`` from ``cfg.MODEL.PSALM.LLM.*`` (or from an HF ``config.json`` dict, checked against cfg).

    The architecture fields of ``cfg`` must agree with ``hf_config`` when it is given (a mismatch
    means the config file does not describe the checkpoint); the vocabulary size is always
    ``MODEL.PSALM.LLM.VOCAB_SIZE``. Dropouts are 0; embeddings are untied; no pad index (the
    official model has none, so the ``[PAD]`` row is an ordinary trainable row).
    """
    from transformers import PhiConfig

    llm = cfg.MODEL.PSALM.LLM
    impl = llm.ATTN_IMPLEMENTATION
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"MODEL.PSALM.LLM.ATTN_IMPLEMENTATION must be 'sdpa' or 'eager', got {impl!r}")
    ours = {attr: llm[key] for key, attr in _ARCH_FIELDS.items()}
    if hf_config is not None:
        ref = PhiConfig(**{k: v for k, v in hf_config.items() if k not in ("architectures", "torch_dtype", "dtype")})
        theirs = {a: getattr(ref, a) for a in _ARCH_FIELDS.values() if a not in ("partial_rotary_factor", "rope_theta")}
        theirs["partial_rotary_factor"] = ref.rope_parameters.get("partial_rotary_factor", 1.0)
        theirs["rope_theta"] = ref.rope_parameters["rope_theta"]
        wrong = {a: (ours[a], theirs[a]) for a in ours if ours[a] != theirs[a]}
        if wrong:
            lines = ", ".join(f"{a}: cfg {o!r} vs config.json {t!r}" for a, (o, t) in wrong.items())
            raise ValueError(
                f"MODEL.PSALM.LLM.* disagrees with {llm.NAME_OR_PATH}/config.json ({lines}); fix the config"
            )
    config = PhiConfig(
        vocab_size=llm.VOCAB_SIZE,
        hidden_size=ours["hidden_size"],
        intermediate_size=ours["intermediate_size"],
        num_hidden_layers=ours["num_hidden_layers"],
        num_attention_heads=ours["num_attention_heads"],
        max_position_embeddings=ours["max_position_embeddings"],
        hidden_act=ours["hidden_act"],
        layer_norm_eps=ours["layer_norm_eps"],
        partial_rotary_factor=ours["partial_rotary_factor"],
        rope_theta=ours["rope_theta"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        qk_layernorm=False,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=impl,
    )
    if hf_config is not None:
        config.initializer_range = float(hf_config.get("initializer_range", config.initializer_range))
    return config


@torch.no_grad()
def init_phi_weights_(model: nn.Module, std: float = 0.02) -> None:
    """transformers' default Phi initialisation, in place: Linear / Embedding ~ N(0, std), biases 0,
    LayerNorm weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


def rebuild_rotary_buffers(model) -> None:
    """Recreate the rotary embedding's non-persistent ``inv_freq`` buffers (lost on the meta device)."""
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    device = model.get_input_embeddings().weight.device
    with torch.device(device):
        model.model.rotary_emb = PhiRotaryEmbedding(model.config)


def build_llm(cfg, tokenizer=None, device: str | torch.device | None = None, init_weights: bool = True):
    """Build the PSALM language model (transformers ``PhiForCausalLM``, ``lm_head`` without bias).

    Args:
        cfg: config with ``MODEL.PSALM.LLM.*``. With ``NAME_OR_PATH`` set, its ``config.json`` gives
            the architecture (checked against ``cfg``) and its weights, if present, are loaded
            strictly (``lm_head.bias`` dropped by name; vocabulary resized to ``VOCAB_SIZE``).
        tokenizer: the PSALM tokenizer; used to check the vocabulary size and to plan the resize of a
            base checkpoint (loaded with :func:`build_tokenizer` when needed and not given).
        device: where the parameters live (default CPU). ``"meta"`` returns the structure only
            (no memory, nothing loaded): for key / shape checks of converted checkpoints.
        init_weights: without a checkpoint, initialise the parameters (transformers' Phi init); False
            leaves them allocated but uninitialised, for a caller that loads every weight next.

    Returns:
        ``PhiForCausalLM`` (fp32). ``model.model(inputs_embeds=..., attention_mask=...)`` gives the
        hidden states after the final LayerNorm, [B, L, H].
    """
    from transformers import PhiForCausalLM

    from psalm.checkpoint import load_strict
    from psalm.checkpoint.phi_keys import hf_phi_to_psalm, read_hf_phi_dir

    llm_cfg = cfg.MODEL.PSALM.LLM
    device = torch.device(device or "cpu")
    on_meta = device.type == "meta"
    path = llm_cfg.NAME_OR_PATH
    hf_sd = hf_config = None
    if path:
        path = pathlib.Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MODEL.PSALM.LLM.NAME_OR_PATH={path} has no config.json (nothing is downloaded)")
        weight_files = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
        if not on_meta and any((path / f).is_file() for f in weight_files):
            hf_sd, hf_config = read_hf_phi_dir(path)
        else:
            hf_config = json.loads((path / "config.json").read_text())
            if not on_meta:
                logger.info("%s has a config but no weights: the LLM is randomly initialised", path)
    config = phi_config_from_cfg(cfg, hf_config)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"MODEL.PSALM.LLM.VOCAB_SIZE={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens); "
            f"set it to at least {len(tokenizer)}"
        )

    with torch.device("meta"):
        model = PhiForCausalLM(config)
        model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    if hf_sd is not None:
        if tokenizer is None:
            tokenizer = build_tokenizer(cfg)
        base, mean_ids = None, ()
        rows = next((v.shape[0] for k, v in hf_sd.items() if k == "model.embed_tokens.weight"), None)
        if rows != config.vocab_size:  # a base checkpoint (phi-1_5: 51200 rows): PSALM's resize
            base, mean_ids = tokenizer_vocab_plan(tokenizer, cfg.MODEL.PSALM.PAD_TOKEN, cfg.MODEL.PSALM.SEG_TOKEN)
        conv = hf_phi_to_psalm(
            hf_sd, hf_config, num_base_tokens=base, target_vocab_size=config.vocab_size, mean_init_ids=mean_ids
        )
        for key, why in conv.dropped.items():
            logger.info("dropped %s: %s", key, why)
        sd = {k: v.to(device=device, dtype=torch.float32) for k, v in conv.state_dict.items()}
        load_strict(model, sd, what=f"Phi weights from {path}")
    elif not on_meta:
        model.to_empty(device=device)
        if init_weights:
            init_phi_weights_(model, config.initializer_range)
    rebuild_rotary_buffers(model)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover and not on_meta:
        raise RuntimeError(f"LLM tensors still on the meta device after loading: {leftover[:5]}")

    if llm_cfg.GRADIENT_CHECKPOINTING:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if llm_cfg.FREEZE:
        model.requires_grad_(False)
        logger.info("LLM frozen (MODEL.PSALM.LLM.FREEZE)")
    if tokenizer is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# ----------------------------------------------------------------------------------------- loss


def causal_lm_loss(
    llm, hidden_states: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Causal-LM loss from the LLM's final hidden states: cross-entropy of ``lm_head(h[:, t])``
    against ``labels[:, t + 1]``, mean over the target tokens.

    ``lm_head`` runs only at the positions whose next label is not ``ignore_index``: a LLaVA-style
    batch takes the loss on a few answer tokens, so the [B, L, V] fp32 logits of the full forward
    (256 image tokens and the prompt included; about 1 GB for 4 samples at V = 50297) are never
    built. The value and the gradients are those of the full-vocabulary, every-position loss
    (``F.cross_entropy`` over ``logits[:, :-1]`` with ``ignore_index``, summed, divided by the
    number of targets). Logits are cast to fp32 before the softmax (bf16 autocast included).
    A batch without any target gives a zero loss that is still attached to the graph (not NaN).

    Args:
        llm: ``PhiForCausalLM`` (its ``lm_head`` is used).
        hidden_states: [B, L, H], ``llm.model(...).last_hidden_state``.
        labels: [B, L] long, ``ignore_index`` where no loss is taken.

    Returns:
        scalar loss.
    """
    if hidden_states.dim() != 3 or hidden_states.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden_states {tuple(hidden_states.shape)} must be [B, L, H] with [B, L] = labels {tuple(labels.shape)}"
        )
    shift_labels = labels[:, 1:].to(hidden_states.device)
    target = shift_labels != ignore_index  # [B, L - 1]
    logits = llm.lm_head(hidden_states[:, :-1][target]).float()  # [N, V]
    loss = F.cross_entropy(logits, shift_labels[target], reduction="sum")
    return loss / target.sum().clamp(min=1)
