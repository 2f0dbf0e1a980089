"""Key conversion for the language side: Phi-1.5 weights and PSALM's LLM-side parameters.

Source layouts handled:

* **official PSALM** (``llava_phi.PSALM``, saved with transformers 4.36): ``model.embed_tokens.weight``,
  ``model.layers.N.self_attn.query_key_value.{weight,bias}`` (fused, interleaved per head),
  ``model.layers.N.self_attn.dense.*``, ``model.layers.N.mlp.fc{1,2}.*``,
  ``model.layers.N.input_layernorm.*``, ``model.final_layernorm.*``, ``lm_head.weight`` (no bias);
  plus ``seg_query`` and the four ``Linear(H->D)`` condition projectors;
* an **HF phi-1_5 directory** (``config.json`` + ``model.safetensors`` / sharded safetensors /
  ``pytorch_model.bin``), either in the transformers >= 4.37 layout (``q_proj`` / ``k_proj`` /
  ``v_proj`` / ``dense``, as ``microsoft/phi-1_5`` is published) or in the 4.36 fused layout
  (``query_key_value``, e.g. ``susnato/phi-1_5_dev``, which PSALM started from). Both carry
  ``lm_head.bias``, which PSALM drops (its ``lm_head`` has no bias), and 51200 vocabulary rows,
  which are resized to the PSALM vocabulary (:func:`resize_vocab_rows`).

Target: transformers 5 ``PhiForCausalLM`` keys (``model.layers.N.self_attn.{q,k,v}_proj`` /
``dense``, ``mlp.fc1`` / ``fc2``, ``input_layernorm``, ``model.embed_tokens``,
``model.final_layernorm``, ``lm_head.weight``), under ``dst_prefix`` (``"llm."`` inside the PSALM
meta-architecture, ``""`` for a bare LLM).

Fused qkv layout (transformers 4.36 ``PhiAttention._split_heads``, Bloom style): the output rows of
``query_key_value`` are ``view(num_heads, 3, head_dim)``: for head h, rows ``[h*3*d, h*3*d + d)`` are
q, the next d rows k, the next d rows v. :func:`split_fused_qkv` / :func:`fuse_qkv` convert.

Functions return :class:`psalm.checkpoint.vision_keys.KeyConversion` (converted tensors, source keys
dropped on purpose with the reason, target keys absent by design); feed the result to
:func:`psalm.checkpoint.load_strict`.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from typing import Mapping, Sequence

import torch

from .vision_keys import KeyConversion

logger = logging.getLogger(__name__)

__all__ = [
    "split_fused_qkv",
    "fuse_qkv",
    "official_llm_to_psalm",
    "official_language_heads_to_psalm",
    "OFFICIAL_LANGUAGE_HEADS",
    "resize_vocab_rows",
    "read_hf_phi_dir",
    "hf_phi_to_psalm",
]

# Our names (PSALM meta-architecture attributes) <- official llava_phi.PSALM names.
OFFICIAL_LANGUAGE_HEADS = {
    "mask_tokens": "seg_query",
    "mask_token_projector": "seg_query_projector",
    "class_projector": "class_name_projector",
    "refer_projector": "SEG_token_projector",
    "region_projector": "region_projector",
}

_LM_HEAD_BIAS_REASON = "PSALM's lm_head has no bias (official llava_phi.py redefines it with bias=False)"


def split_fused_qkv(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a transformers-4.36 Phi ``query_key_value`` weight [3H, H_in] or bias [3H] into q, k, v.

    The rows are interleaved per head: ``fused.view(num_heads, 3, head_dim, ...)[:, i]`` is q (i=0),
    k (i=1), v (i=2). Returns three tensors of shape [H, H_in] (or [H]).
    """
    rows = fused.shape[0]
    if rows % (3 * num_heads):
        raise ValueError(
            f"fused query_key_value has {rows} rows, not divisible by 3 * num_heads = {3 * num_heads}; "
            "wrong num_attention_heads?"
        )
    head_dim = rows // (3 * num_heads)
    parts = fused.reshape(num_heads, 3, head_dim, *fused.shape[1:])
    return tuple(parts[:, i].reshape(num_heads * head_dim, *fused.shape[1:]).clone() for i in range(3))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`split_fused_qkv`: q, k, v [H, ...] -> interleaved ``query_key_value`` [3H, ...]."""
    if not (q.shape == k.shape == v.shape) or q.shape[0] % num_heads:
        raise ValueError(
            f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fit {num_heads} heads"
        )
    head_dim = q.shape[0] // num_heads
    stacked = torch.stack([t.reshape(num_heads, head_dim, *t.shape[1:]) for t in (q, k, v)], dim=1)
    return stacked.reshape(3 * q.shape[0], *q.shape[1:])


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_SAME_NAME_LAYER_PARTS = (
    "self_attn.q_proj.",
    "self_attn.k_proj.",
    "self_attn.v_proj.",
    "self_attn.dense.",
    "mlp.fc1.",
    "mlp.fc2.",
    "input_layernorm.",
)
_TOP_LEVEL = (
    "model.embed_tokens.weight",
    "model.final_layernorm.weight",
    "model.final_layernorm.bias",
    "lm_head.weight",
)


def _is_phi_key(key: str) -> bool:
    return key in _TOP_LEVEL or key == "lm_head.bias" or key.startswith("model.layers.")


def official_llm_to_psalm(
    sd: Mapping[str, torch.Tensor], num_attention_heads: int, dst_prefix: str = "llm."
) -> KeyConversion:
    """Phi keys of an official PSALM (or transformers-4.36 / 4.37+ Phi) state dict -> ``PhiForCausalLM`` keys.

    Only the Phi keys are read (``model.embed_tokens.*``, ``model.layers.*``, ``model.final_layernorm.*``,
    ``lm_head.*``); the other official groups (``model.vision_tower.*``, ``model.mm_projector.*``,
    ``seg_query``, ...) belong to other converters and are ignored.

    =====================================================  ==============================================
    source                                                  ours (under ``dst_prefix``)
    =====================================================  ==============================================
    ``model.layers.N.self_attn.query_key_value.{w,b}``      split per head -> ``...self_attn.{q,k,v}_proj.*``
    ``model.layers.N.self_attn.{q,k,v}_proj.*`` (4.37+)     same name
    ``model.layers.N.self_attn.dense.*``                    same name
    ``model.layers.N.mlp.fc{1,2}.*``, ``input_layernorm.*``  same name
    ``model.embed_tokens.weight``, ``model.final_layernorm.*``, ``lm_head.weight``  same name
    ``lm_head.bias``                                        dropped (PSALM's lm_head has no bias)
    =====================================================  ==============================================

    Layer keys that match no rule are passed through unchanged so that ``load_strict`` reports
    them by name.
    """
    out, dropped = {}, {}
    found = False
    for key, value in sd.items():
        if not _is_phi_key(key):
            continue
        found = True
        if key == "lm_head.bias":
            dropped[key] = _LM_HEAD_BIAS_REASON
            continue
        m = _LAYER_KEY.fullmatch(key)
        if m and m[2] in ("self_attn.query_key_value.weight", "self_attn.query_key_value.bias"):
            kind = m[2].rsplit(".", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), split_fused_qkv(value, num_attention_heads)):
                out[f"{dst_prefix}model.layers.{m[1]}.self_attn.{name}.{kind}"] = part
            continue
        out[dst_prefix + key] = value
    if not found:
        sample = ", ".join(list(sd)[:5])
        raise ValueError(
            f"no Phi key (model.embed_tokens / model.layers / lm_head) in the state dict (first keys: {sample})"
        )
    return KeyConversion(out, dropped)


def official_language_heads_to_psalm(sd: Mapping[str, torch.Tensor], dst_prefix: str = "") -> KeyConversion:
    """Official ``seg_query`` and condition projectors -> PSALM meta-architecture names.

    ``seg_query`` [Q, H] -> ``mask_tokens``; ``seg_query_projector.*`` -> ``mask_token_projector.*``;
    ``class_name_projector.*`` -> ``class_projector.*``; ``SEG_token_projector.*`` -> ``refer_projector.*``;
    ``region_projector.*`` -> ``region_projector.*`` (see :data:`OFFICIAL_LANGUAGE_HEADS`).
    Every one of them must be present.
    """
    out = {}
    for ours, theirs in OFFICIAL_LANGUAGE_HEADS.items():
        if ours == "mask_tokens":
            if theirs not in sd:
                raise KeyError(f"official state dict has no {theirs!r}")
            out[dst_prefix + ours] = sd[theirs]
            continue
        keys = [k for k in sd if k.startswith(theirs + ".")]
        if not keys:
            raise KeyError(f"official state dict has no {theirs}.* keys")
        for k in keys:
            out[dst_prefix + ours + k[len(theirs) :]] = sd[k]
    return KeyConversion(out)


def resize_vocab_rows(
    weight: torch.Tensor,
    num_base_tokens: int,
    target_vocab_size: int,
    mean_init_ids: Sequence[int] = (),
    init_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize an embedding / ``lm_head`` matrix [V_ckpt, H] to [target_vocab_size, H] as PSALM's ``train.py`` does.

    * rows ``[0, num_base_tokens)`` (the base tokenizer's tokens) are copied;
    * rows in ``mean_init_ids`` (``[PAD]`` when PSALM added it) are the mean of the base rows
      (official ``smart_tokenizer_and_embedding_resize``);
    * every other new row (``[SEG]``, and any spare rows up to ``target_vocab_size``) is drawn from
      N(0, ``init_std``) (transformers' default init on resize; Phi: ``initializer_range`` = 0.02).

    Checkpoint rows at or beyond ``num_base_tokens`` (phi-1_5 pads its 50295 tokens to 51200 rows)
    are discarded, as the official shrink-then-grow resize does.
    """
    if not 0 < num_base_tokens <= min(weight.shape[0], target_vocab_size):
        raise ValueError(
            f"num_base_tokens={num_base_tokens} must be in (0, min(checkpoint rows {weight.shape[0]}, "
            f"target vocab {target_vocab_size})]"
        )
    bad = [i for i in mean_init_ids if not num_base_tokens <= i < target_vocab_size]
    if bad:
        raise ValueError(f"mean_init_ids {bad} must lie in [{num_base_tokens}, {target_vocab_size})")
    base = weight[:num_base_tokens]
    n_new = target_vocab_size - num_base_tokens
    new = torch.empty(n_new, weight.shape[1], dtype=torch.float32)
    new.normal_(0.0, init_std, generator=generator)
    new = new.to(weight.dtype)
    if mean_init_ids:
        mean = base.float().mean(0).to(weight.dtype)
        for i in mean_init_ids:
            new[i - num_base_tokens] = mean
    return torch.cat([base, new], dim=0)


def read_hf_phi_dir(path: str | pathlib.Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an HF Phi directory: (state dict as stored, ``config.json`` as a dict).

    Weights: ``model.safetensors``, or ``model.safetensors.index.json`` + shards, or
    ``pytorch_model.bin`` (loaded with ``weights_only=True``). Raises ``FileNotFoundError`` naming
    what is missing.
    """
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not an HF model directory")
    config = json.loads(cfg_file.read_text())
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        sd = load_file(str(path / "model.safetensors"))
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        sd = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(str(path / shard)))
    elif (path / "pytorch_model.bin").is_file():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"no weights in {path}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    return sd, config


def hf_phi_to_psalm(
    sd: Mapping[str, torch.Tensor],
    config: Mapping,
    num_base_tokens: int | None = None,
    target_vocab_size: int | None = None,
    mean_init_ids: Sequence[int] = (),
    seed: int = 0,
    dst_prefix: str = "",
) -> KeyConversion:
    """HF phi-1_5 weights (either layout) -> our ``PhiForCausalLM`` state dict, vocabulary resized.

    Args:
        sd, config: from :func:`read_hf_phi_dir`.
        num_base_tokens: rows kept from the checkpoint (the base tokenizer's length, 50295 for
            phi-1_5); required when ``target_vocab_size`` differs from the checkpoint's rows.
        target_vocab_size: rows of our embedding / ``lm_head`` (PSALM: 50297). ``None``, or the
            checkpoint's own row count (e.g. an LLM already trained with PSALM's vocabulary),
            keeps the rows as they are: nothing is re-initialised.
        mean_init_ids: new rows initialised to the mean of the base rows (``[PAD]``).
        seed: seed of the N(0, initializer_range) draw for the other new rows (``[SEG]``).
        dst_prefix: prefix of the returned keys.

    ``lm_head.bias`` is dropped (``KeyConversion.dropped`` names it). The legacy remote-code
    layout (``transformer.h.N.mixer.Wqkv``) is refused with an explanation.
    """
    if any(k.startswith(("transformer.", "layers.0.wte")) for k in sd):
        raise ValueError(
            "this Phi checkpoint is in the old remote-code (MixFormer) layout (transformer.h.N.mixer.*); "
            "convert it to the transformers layout first (transformers' convert_phi_weights_to_hf.py) "
            "or use a transformers-format phi-1_5 directory"
        )
    if config.get("model_type", "phi") != "phi":
        raise ValueError(f"config.json model_type is {config.get('model_type')!r}, expected 'phi'")
    conv = official_llm_to_psalm(sd, int(config["num_attention_heads"]), dst_prefix=dst_prefix)
    rows = conv.state_dict[dst_prefix + "model.embed_tokens.weight"].shape[0]
    if target_vocab_size is not None and target_vocab_size != rows:
        if num_base_tokens is None:
            raise ValueError(
                f"the checkpoint has {rows} vocabulary rows and {target_vocab_size} are wanted: pass "
                "num_base_tokens (the base tokenizer's length) so the resize knows which rows are real"
            )
        target = target_vocab_size
        init_std = float(config.get("initializer_range", 0.02))
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            gen = torch.Generator().manual_seed(seed + (0 if key.startswith("model.") else 1))
            conv.state_dict[dst_prefix + key] = resize_vocab_rows(
                conv.state_dict[dst_prefix + key], num_base_tokens, target, mean_init_ids, init_std, gen
            )
        logger.info(
            "Phi vocabulary resized %d -> %d rows: kept [0, %d), mean-initialised %s, N(0, %g) for the rest",
            rows,
            target,
            num_base_tokens,
            list(mean_init_ids),
            init_std,
        )
    return conv
