"""Codebook tokens: gathering the LLM hidden states that feed the decoder, and token fusion.

A target is one group of L*N codebook tokens ``[SEG0]..[SEG{L*N-1}]`` in the text. Group tokens
``[SEG(l*N)]..[SEG(l*N+N-1)]`` belong to scale l (the official ``view(K, L, N, C)``).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

__all__ = ["codebook_tokens", "codebook_token_ids", "codebook_positions", "TokenFusion", "ScaleFusion",
           "PromptBatchNorm", "build_prompt_norm"]

logger = logging.getLogger(__name__)


def codebook_tokens(num_scales: int, tokens_per_scale: int) -> list[str]:
    return [f"[SEG{i}]" for i in range(num_scales * tokens_per_scale)]


def codebook_token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Ids through ``convert_tokens_to_ids`` (the official ``tokenizer(tok).input_ids[0]`` collapses
    to the "▁" id on some tokenizer versions); an unknown or repeated id is an error."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    unk = getattr(tokenizer, "unk_token_id", None)
    bad = [t for t, i in zip(tokens, ids) if i is None or i == unk]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(
            f"the tokenizer does not have the codebook tokens {list(tokens)} as distinct tokens (got ids {ids}); "
            "add them with tokenizer.add_tokens([...]) before building the model"
        )
    return ids


def codebook_positions(ids: torch.Tensor, valid: torch.Tensor, codebook_ids: Sequence[int], tap: str = "preceding",
                       strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the hidden states that feed the decoder, in sequence order.

    Args:
        ids: [T] spliced token ids (image positions carry any non-codebook value).
        valid: [T] bool, real (non-padding) positions.
        codebook_ids: the L*N ids in group order.
        tap: "preceding" (official: the state before each codebook token) or "at".
        strict: a malformed group (tokens out of order, incomplete) raises; otherwise the answer
            gives no masks and a warning is logged (inference).

    Returns:
        positions [n] (n = K*L*N) and the number of targets K (0-d long).
    """
    code = torch.zeros_like(ids, dtype=torch.bool)
    for i in codebook_ids:
        code |= ids == i
    code &= valid
    where = code.nonzero()[:, 0]
    g = len(codebook_ids)
    expected = torch.tensor(list(codebook_ids), device=ids.device).repeat(len(where) // g) if len(where) % g == 0 else None
    if expected is None or not torch.equal(ids[where], expected):
        msg = (f"the answer has {len(where)} codebook tokens, which is not a sequence of complete groups "
               f"{list(codebook_ids)} (a multiple of {g} in group order)")
        if strict:
            raise ValueError(msg + "; fix the answer text / truncation")
        logger.warning(msg + "; no masks for this answer")
        return where[:0], torch.tensor(0)
    if tap == "preceding":
        if len(where) and int(where.min()) == 0:
            raise ValueError("a codebook token at position 0 has no preceding state")
        where = where - 1
    elif tap != "at":
        raise ValueError(f"HIDDEN_TAP must be 'preceding' or 'at', got {tap!r}")
    return where, torch.tensor(len(where) // g)


class TokenFusion(nn.Module):
    """h^l = sum_n w_n h_{l,n}: [K, L, N, D] -> [K, L, D].

    ``mode``: "compat" = the official constants float32(1/(L*N)) (the official list has one weight
    per codebook token but the loop uses the first N, so the fused token is 1/L of the mean),
    "mean" = 1/N, "learned" = the paper's learnable weights (initialised to 1/N).
    """

    def __init__(self, num_scales: int, tokens_per_scale: int, mode: str = "compat"):
        super().__init__()
        n = tokens_per_scale
        if mode == "compat":
            import numpy as np

            w = torch.full((n,), float(np.float32(1.0 / (num_scales * n))))
        elif mode in ("mean", "learned"):
            w = torch.full((n,), 1.0 / n)
        else:
            raise ValueError(f"TOKEN_FUSION must be 'compat', 'mean' or 'learned', got {mode!r}")
        self.mode = mode
        if mode == "learned":
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(h.dtype)
        out = h[:, :, 0] * 0
        for i in range(h.shape[2]):
            out = out + w[i] * h[:, :, i]
        return out


class ScaleFusion(nn.Module):
    """M = sum_l g_l * m_l; "compat" constants 1/L, "learned" = the paper's learnable weights."""

    def __init__(self, num_scales: int, mode: str = "compat"):
        super().__init__()
        w = torch.full((num_scales,), 1.0 / num_scales)
        if mode == "learned":
            self.weight = nn.Parameter(w)
        elif mode == "compat":
            self.register_buffer("weight", w, persistent=False)
        else:
            raise ValueError(f"SCALE_FUSION must be 'compat' or 'learned', got {mode!r}")
        self.mode = mode


class PromptBatchNorm(nn.BatchNorm1d):
    """``CODEBOOK.PROMPT_NORM "batch"`` (not in the release): batch norm of the fused prompts
    [K, L*D] over every target of the batch. It removes the component that all targets share and
    scales what tells them apart to unit variance (a model trained from scratch starts with prompts
    that differ by 2-3% between targets). A training batch with a single target uses the running
    statistics (batch statistics of one sample are undefined)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        return super().forward(x)


def build_prompt_norm(mode: str, num_scales: int, dim: int) -> nn.Module | None:
    """``CODEBOOK.PROMPT_NORM``: "none" (official) or "batch" (:class:`PromptBatchNorm`)."""
    if mode == "none":
        return None
    if mode == "batch":
        return PromptBatchNorm(num_scales * dim)
    raise ValueError(f"MODEL.PIXELLM.CODEBOOK.PROMPT_NORM must be 'none' or 'batch', got {mode!r}")
