"""Tokenizer loading for PixelLM (the release: slow LLaMA ``tokenizer.model`` + added tokens)."""
from __future__ import annotations

import logging

__all__ = ["load_pixellm_tokenizer", "add_pixellm_tokens", "PIXELLM_EXTRA_TOKENS"]

logger = logging.getLogger(__name__)
PIXELLM_EXTRA_TOKENS = ("<im_start>", "<im_end>")


def load_pixellm_tokenizer(path, required: bool = True):
    """``AutoTokenizer.from_pretrained(path)`` with ``pad_token = unk_token`` (official ``train_ds``).

    ``required=False``: a tokenizer that this environment cannot load (e.g. a sentencepiece model
    without the ``sentencepiece`` package) gives ``None`` and a warning; the model then runs on token
    ids only (teacher-forced evaluation), and the predictor refuses to run.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - the reason is reported
        if required:
            raise RuntimeError(f"cannot load the tokenizer in {path}: {e}") from e
        logger.warning("tokenizer in %s cannot be loaded here (%s); running on token ids only", path, e)
        return None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def add_pixellm_tokens(tokenizer, codebook: list[str]) -> None:
    """Add the codebook tokens and <im_start>/<im_end> (special) as the official ``train_ds.py``."""
    tokenizer.add_tokens(list(codebook))
    tokenizer.add_tokens(list(PIXELLM_EXTRA_TOKENS), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
