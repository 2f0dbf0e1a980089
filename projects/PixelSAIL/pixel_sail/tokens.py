"""The official special tokens and the tokenizer extension (spec B1.1, B4, B7.10).

Base multimodal tokens of the authors' Qwen2.5-MM tokenizer: ``<vision>``, ``<vpatch>``, ``</vision>``,
``<vrow_sep>``, ``<vframe_sep>``, ``<|vis_cls|>``; added by Pixel-SAIL: ``[SEG]``, ``<p>``, ``</p>``,
``<Prompt0>`` .. ``<Prompt{K-1}>`` and ``<NO_Prompt>``. The qwen_chat turn tokens ``<|im_start|>`` /
``<|im_end|>`` and ``<|endoftext|>`` are Qwen2.5's own (added here too when a tokenizer lacks them, e.g.
the tiny test tokenizer). Ids are looked up with ``convert_tokens_to_ids`` (not ``tokenizer(tok)[0]``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List

logger = logging.getLogger(__name__)

__all__ = [
    "VISION_START", "VISION_PATCH", "VISION_END", "BASE_MM_TOKENS", "SEG_TOKEN", "PHRASE_START", "PHRASE_END",
    "NO_PROMPT_TOKEN", "IM_START", "IM_END", "EOS_TOKEN", "prompt_token", "official_special_tokens",
    "extend_tokenizer", "load_pixel_sail_tokenizer", "TokenIds",
]

VISION_START, VISION_PATCH, VISION_END = "<vision>", "<vpatch>", "</vision>"
BASE_MM_TOKENS = (VISION_START, VISION_PATCH, VISION_END, "<vrow_sep>", "<vframe_sep>", "<|vis_cls|>")
SEG_TOKEN, PHRASE_START, PHRASE_END = "[SEG]", "<p>", "</p>"
NO_PROMPT_TOKEN = "<NO_Prompt>"
IM_START, IM_END, EOS_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def prompt_token(k: int) -> str:
    return f"<Prompt{k}>"


def official_special_tokens(num_visual_prompts: int) -> List[str]:
    """Every token Pixel-SAIL needs, in a fixed order (chat tokens first, then the MM and added tokens)."""
    return [IM_START, IM_END, *BASE_MM_TOKENS, SEG_TOKEN, PHRASE_START, PHRASE_END,
            *[prompt_token(k) for k in range(num_visual_prompts)], NO_PROMPT_TOKEN]


def extend_tokenizer(tokenizer, num_visual_prompts: int):
    """Add the missing official tokens as special tokens (never split) and check each is one token.

    ``<|endoftext|>`` must already exist (it ends every answer). A tokenizer without a pad token gets
    ``<|endoftext|>`` as pad (Qwen2.5's own convention). Returns the tokenizer (modified in place).
    """
    vocab = tokenizer.get_vocab()
    if EOS_TOKEN not in vocab:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN!r} token; Pixel-SAIL ends every answer with it "
                         "(use a Qwen2 / Qwen2.5 tokenizer, or psalm.data.tokenizer.save_tiny_tokenizer)")
    missing = [t for t in official_special_tokens(num_visual_prompts) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        logger.info("added %d Pixel-SAIL special tokens to the tokenizer", len(missing))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN
    for tok in official_special_tokens(num_visual_prompts) + [EOS_TOKEN]:
        ids = tokenizer.encode(tok, add_special_tokens=False)
        if len(ids) != 1 or ids[0] != tokenizer.convert_tokens_to_ids(tok):
            raise ValueError(f"{tok!r} must encode to exactly one token, got {ids}")
    return tokenizer


def load_pixel_sail_tokenizer(path: str, num_visual_prompts: int, model_max_length: int = 8192):
    """A local HF tokenizer directory (nothing is downloaded), extended by :func:`extend_tokenizer`."""
    import os

    from transformers import AutoTokenizer

    if not path:
        raise ValueError("no tokenizer directory: set MODEL.PIXEL_SAIL.TOKENIZER (or MODEL.PIXEL_SAIL.LLM.NAME_OR_PATH)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (nothing is downloaded)")
    tok = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True,
                                        model_max_length=model_max_length, padding_side="right")
    return extend_tokenizer(tok, num_visual_prompts)


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The ids the model and the sequence builder need."""

    vision_start: int
    vision_patch: int
    vision_end: int
    seg: int
    eos: int
    im_start: int
    im_end: int
    pad: int
    prompts: tuple  # <Prompt0> .. <Prompt{K-1}>
    no_prompt: int

    @classmethod
    def from_tokenizer(cls, tokenizer, num_visual_prompts: int) -> "TokenIds":
        c = tokenizer.convert_tokens_to_ids
        unk = tokenizer.unk_token_id
        ids = dict(vision_start=c(VISION_START), vision_patch=c(VISION_PATCH), vision_end=c(VISION_END),
                   seg=c(SEG_TOKEN), eos=c(EOS_TOKEN), im_start=c(IM_START), im_end=c(IM_END),
                   pad=tokenizer.pad_token_id, no_prompt=c(NO_PROMPT_TOKEN))
        prompts = tuple(c(prompt_token(k)) for k in range(num_visual_prompts))
        for name, v in list(ids.items()) + [(prompt_token(k), v) for k, v in enumerate(prompts)]:
            if v is None or (v == unk and name != "eos"):
                raise ValueError(f"token {name} is missing from the tokenizer: call extend_tokenizer first")
        return cls(prompts=prompts, **ids)
