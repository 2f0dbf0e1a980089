"""Build a PixelLM model from a config or a converted model directory.

An *architecture spec* (plain dict, stored as ``config.json`` of a converted model directory) fixes
every size: ``llm`` (``LlamaConfig`` kwargs), ``vision`` (``CLIPVisionConfig`` kwargs, ``image_size``
= the input size S), ``decoder``, ``codebook`` (``tokens_per_scale``, ``scales``, ``ids``),
``taps``, ``llm_grid``, special ids. Behaviour options (fusion modes, losses, LoRA, trainable set)
come from ``cfg.MODEL.PIXELLM``.
"""
from __future__ import annotations

import json
import logging
import pathlib

import torch

from .codebook import ScaleFusion, TokenFusion, build_prompt_norm
from .losses import PixelLMMaskLoss
from .mask_decoder import MultiScaleMaskDecoder, PixelLMPromptEncoder, neck
from .vision import PixelLMVisionTower

__all__ = ["SPEC_FORMAT", "spec_from_cfg", "load_spec", "build_llm", "build_clip", "pixellm_components",
           "build_pixellm", "apply_trainable_set"]

logger = logging.getLogger(__name__)
SPEC_FORMAT = "psalm-pixellm-1"
_SIZE_KEYS = ("VISION", "LLM", "DECODER")


def spec_from_cfg(cfg) -> dict:
    p = cfg.MODEL.PIXELLM
    v, l, d, c = p.VISION, p.LLM, p.DECODER, p.CODEBOOK
    n = c.TOKENS_PER_SCALE * c.SCALES
    return {
        "format": SPEC_FORMAT,
        "llm": dict(vocab_size=l.VOCAB_SIZE, hidden_size=l.HIDDEN_SIZE, intermediate_size=l.INTERMEDIATE_SIZE,
                    num_hidden_layers=l.NUM_LAYERS, num_attention_heads=l.NUM_HEADS,
                    num_key_value_heads=l.NUM_KV_HEADS, rms_norm_eps=l.RMS_NORM_EPS,
                    max_position_embeddings=l.MAX_POSITION_EMBEDDINGS, rope_theta=l.ROPE_THETA,
                    hidden_act="silu", tie_word_embeddings=False),
        "vision": dict(hidden_size=v.HIDDEN_SIZE, intermediate_size=v.INTERMEDIATE_SIZE,
                       num_hidden_layers=v.NUM_LAYERS, num_attention_heads=v.NUM_HEADS, patch_size=v.PATCH_SIZE,
                       image_size=v.IMAGE_SIZE, hidden_act=v.HIDDEN_ACT, layer_norm_eps=1e-5),
        "decoder": dict(dim=d.DIM, depth=d.DEPTH, num_heads=d.NUM_HEADS, mlp_dim=d.MLP_DIM,
                        iou_head_hidden_dim=d.IOU_HEAD_HIDDEN_DIM),
        "codebook": {"tokens_per_scale": c.TOKENS_PER_SCALE, "scales": c.SCALES,
                     # tiny configs without a tokenizer: the last L*N ids of the vocabulary
                     "ids": list(range(l.VOCAB_SIZE - n, l.VOCAB_SIZE))},
        "taps": list(v.TAPS),
        "llm_grid": v.LLM_GRID,
        "pad_aware": v.PAD_AWARE,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }


def load_spec(model_dir) -> dict:
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: MODEL.PIXELLM.MODEL_DIR must be a converted PixelLM directory "
                                "(projects/PixelLM/convert_release.py)")
    spec = json.loads(path.read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{path} is not a converted PixelLM directory (format {spec.get('format')!r}, "
                         f"expected {SPEC_FORMAT!r}); convert the release with projects/PixelLM/convert_release.py")
    return spec


def build_llm(spec: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec["llm"])
    config._attn_implementation = "eager"  # fp32 softmax, as transformers 4.31's LLaMA (the release)
    return LlamaForCausalLM(config)


def build_clip(spec: dict):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**spec["vision"])
    config._attn_implementation = "sdpa"  # native-dtype softmax, as 4.31's CLIP
    return CLIPVisionModel(config)


def _check_sizes_unset(cfg):
    from detectron2.config import get_cfg

    from ..config import add_pixellm_config

    ref = add_pixellm_config(get_cfg()).MODEL.PIXELLM
    for key in _SIZE_KEYS:
        for name, value in cfg.MODEL.PIXELLM[key].items():
            if name in ("GRADIENT_CHECKPOINTING", "LORA", "PAD_AWARE"):
                continue
            if ref[key][name] != value:
                raise ValueError(
                    f"MODEL.PIXELLM.{key}.{name}={value!r} is set, but MODEL.PIXELLM.MODEL_DIR fixes the architecture "
                    "(its config.json); remove the size from the config")


def apply_trainable_set(model, train_neck_and_prompt_encoder: bool = False, train_llm: bool = False,
                        train_vision: bool = False) -> list[str]:
    """The official trainable set: LoRA parameters (if any), ``lm_head``, ``embed_tokens``,
    ``mask_decoder``, ``text_hidden_fcs``, ``mm_projector``, ``out_mm_projector`` (+ learned fusion
    weights, ``prompt_norm``); CLIP frozen unless ``train_vision``; neck and prompt encoder frozen unless enabled.
    Returns the trainable names."""
    train = ["lm_head", "embed_tokens", "mask_decoder.", "text_hidden_fcs.", "mm_projector.",
             "token_fusion.", "scale_fusion.", "prompt_norm.", "lora_"]
    if train_neck_and_prompt_encoder:
        train += ["image_feature_neck.", "prompt_encoder.no_mask_embed"]
    if train_llm:
        train += ["llm."]
    names = []
    for n, p in model.named_parameters():
        on = (any(t in n for t in train) and not n.startswith("vision_tower.")) or (
            train_vision and n.startswith("vision_tower."))
        if "positional_embedding" in n:  # SAM's random-Fourier matrices are buffers, never trained
            on = False
        p.requires_grad_(on)
        if on:
            names.append(n)
    return names


def modules_from_spec(spec: dict, token_mode: str = "compat", scale_mode: str = "compat") -> dict:
    """The ``nn.Module`` kwargs of ``PixelLM`` for an architecture spec (random init)."""
    from .meta_arch import projector, text_hidden_fcs

    codebook = spec["codebook"]
    hidden, dim = spec["llm"]["hidden_size"], spec["decoder"]["dim"]
    dec = spec["decoder"]
    vision = PixelLMVisionTower(build_clip(spec), taps=spec["taps"], llm_grid=spec["llm_grid"],
                                pad_aware=spec.get("pad_aware", True))
    return {
        "vision_tower": vision,
        "llm": build_llm(spec),
        "mm_projector": projector(spec["vision"]["hidden_size"], hidden),
        "out_mm_projector": projector(spec["vision"]["hidden_size"], hidden),
        "image_feature_neck": neck(hidden, dim),
        "text_hidden_fcs": text_hidden_fcs(hidden, dim),
        "prompt_encoder": PixelLMPromptEncoder(dim, vision.grid),
        "mask_decoder": MultiScaleMaskDecoder(dim, dec["depth"], dec["num_heads"], dec["mlp_dim"], codebook["scales"],
                                              dec["iou_head_hidden_dim"]),
        "token_fusion": TokenFusion(codebook["scales"], codebook["tokens_per_scale"], token_mode),
        "scale_fusion": ScaleFusion(codebook["scales"], scale_mode),
    }


def pixellm_module_tree(spec: dict):
    """A ``PixelLM`` with the spec's structure and default behaviour (e.g. on the meta device)."""
    from .meta_arch import PixelLM

    return PixelLM(**modules_from_spec(spec), codebook_ids=spec["codebook"]["ids"], mask_loss=PixelLMMaskLoss())


def pixellm_components(cfg, tokenizer=None) -> dict:
    """``PixelLM.__init__`` kwargs from ``cfg`` (and ``MODEL.PIXELLM.MODEL_DIR`` when set)."""
    from psalm.checkpoint.strict import load_strict

    p = cfg.MODEL.PIXELLM
    if p.SETTING not in ("compat", "paper"):
        raise ValueError(f"MODEL.PIXELLM.SETTING must be 'compat' or 'paper', got {p.SETTING!r}")
    model_dir = p.MODEL_DIR
    if model_dir:
        _check_sizes_unset(cfg)
        spec = load_spec(model_dir)
    else:
        if not p.ALLOW_RANDOM_INIT:
            raise ValueError(
                "MODEL.PIXELLM.MODEL_DIR is empty: the model would have random weights. Convert the release "
                "(projects/PixelLM/convert_release.py) and set MODEL.PIXELLM.MODEL_DIR, or set "
                "MODEL.PIXELLM.ALLOW_RANDOM_INIT True for a model trained from scratch (tests)")
        spec = spec_from_cfg(cfg)
    paper = p.SETTING == "paper"
    token_mode = "learned" if paper else p.CODEBOOK.TOKEN_FUSION
    scale_mode = "learned" if paper else p.CODEBOOK.SCALE_FUSION
    trl = True if paper else p.LOSS.TRL
    codebook = spec["codebook"]
    if tokenizer is None and (p.TOKENIZER or model_dir):
        from .tokenizer import load_pixellm_tokenizer

        tokenizer = load_pixellm_tokenizer(p.TOKENIZER or model_dir, required=bool(p.TOKENIZER))
    if tokenizer is not None:
        from .codebook import codebook_token_ids, codebook_tokens

        ids = codebook_token_ids(tokenizer, codebook_tokens(codebook["scales"], codebook["tokens_per_scale"]))
        if model_dir and ids != list(codebook["ids"]):
            raise ValueError(f"the tokenizer's codebook ids {ids} differ from the model's {codebook['ids']}")
        codebook = dict(codebook, ids=ids)
        if not model_dir:
            if len(tokenizer) > spec["llm"]["vocab_size"]:
                raise ValueError(f"the tokenizer has {len(tokenizer)} entries, more than MODEL.PIXELLM.LLM.VOCAB_SIZE="
                                 f"{spec['llm']['vocab_size']}")
            spec["pad_token_id"], spec["eos_token_id"] = tokenizer.pad_token_id, tokenizer.eos_token_id
    kwargs = modules_from_spec(spec, token_mode, scale_mode)
    kwargs.update({
        "codebook_ids": codebook["ids"],
        "mask_loss": PixelLMMaskLoss(p.LOSS.BCE_WEIGHT, p.LOSS.DICE_WEIGHT, p.LOSS.NUM_POINTS, p.LOSS.OVERSAMPLE_RATIO,
                                     p.LOSS.IMPORTANCE_SAMPLE_RATIO, trl, p.LOSS.TRL_ALPHA),
        "ce_weight": p.LOSS.CE_WEIGHT,
        "hidden_tap": p.CODEBOOK.HIDDEN_TAP,
        "out_size": p.OUT_SIZE,
        "pad_token_id": spec["pad_token_id"],
        "eos_token_id": spec["eos_token_id"],
        "tokenizer": tokenizer,
        "max_new_tokens": p.MAX_NEW_TOKENS,
        "prompt_norm": build_prompt_norm(p.CODEBOOK.PROMPT_NORM, codebook["scales"], spec["decoder"]["dim"]),
        "prompt_mask_weight": p.LOSS.PROMPT_MASK_WEIGHT,
    })
    if model_dir:
        from safetensors.torch import load_file

        from .meta_arch import PixelLM

        # load into a bare module tree first so the report names our keys
        holder = PixelLM(**kwargs)  # (trainable set re-applied by the final model)
        sd = load_file(str(pathlib.Path(model_dir) / "model.safetensors"))
        learned = [f"{n}.weight" for n, mode in (("token_fusion", token_mode), ("scale_fusion", scale_mode))
                   if mode == "learned"]  # fine-tuning the release with the paper's learnable fusion
        if holder.prompt_norm is not None:  # an option the release does not have: starts as identity
            learned += [f"prompt_norm.{k}" for k in holder.prompt_norm.state_dict()]
        load_strict(holder, sd, allow_missing=learned, what=f"PixelLM weights in {model_dir}")
        kwargs = {k: getattr(holder, k) if isinstance(v, torch.nn.Module) else v for k, v in kwargs.items()}
    if p.LLM.LORA.ENABLED and p.LLM.TRAIN_FULL:
        raise ValueError("MODEL.PIXELLM.LLM.LORA.ENABLED and TRAIN_FULL exclude each other")
    if p.LLM.LORA.ENABLED:
        from peft import LoraConfig, get_peft_model

        lora = p.LLM.LORA
        kwargs["llm"] = get_peft_model(kwargs["llm"], LoraConfig(
            r=lora.R, lora_alpha=lora.ALPHA, lora_dropout=lora.DROPOUT, target_modules=list(lora.TARGET_MODULES),
            bias="none", task_type="CAUSAL_LM"))
    if p.LLM.GRADIENT_CHECKPOINTING:
        kwargs["llm"].gradient_checkpointing_enable()
    return kwargs


def build_pixellm(cfg, tokenizer=None):
    """The model with the official trainable set applied."""
    from .meta_arch import PixelLM

    model = PixelLM(cfg, tokenizer=tokenizer)
    logger.info("PixelLM: %d trainable tensors", len(model.trainable_names))
    return model
