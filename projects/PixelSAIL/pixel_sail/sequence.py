"""One sequence builder and one collate for training, evaluation, generation and the predictor.

Layout (spec B1.1, xtuner ``qwen_chat`` with no system prompt and no assistant tag, image first)::

    <vision> <vpatch> x (h * w) </vision> { <|im_start|>user\\n{question}<|im_end|>\\n {answer}<|endoftext|> } ...

Only answer tokens (including ``<|endoftext|>``) carry LM labels. Per position the sample records

* ``vp_index``: -1 text, -2 patch without a visual prompt, k patch covered by prompt k (later prompts
  overwrite earlier ones: pass the prompt masks largest first so that small objects win);
* the vision block span ``[vision_start - 1, vision_start + h * w]`` (``<vision>`` .. ``</vision>``).

``collate`` pads a batch and builds the 4-D attention mask (causal, plus full attention inside every
sample's vision block), the (t, h, w) position ids and the patch-row index of every ``<vpatch>``
position into the concatenation of the batch's patches (sample b's patches start at the number of
patches before it: no off-by-one, spec B7.7).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from .tokens import EOS_TOKEN, IM_END, IM_START, TokenIds

__all__ = ["PixelSAILSample", "PixelSAILBatch", "build_sample", "generation_prefix", "collate", "position_ids_3d",
           "user_turn_text"]

IGNORE_INDEX = -100


def user_turn_text(question: str) -> str:
    """The qwen_chat user turn (``<image>`` placeholders removed: the image comes first)."""
    question = question.replace("<image>\n", "").replace("<image>", "").strip()
    return f"{IM_START}user\n{question}{IM_END}\n"


@dataclasses.dataclass
class PixelSAILSample:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, IGNORE_INDEX where no LM loss
    vp_index: torch.Tensor  # [L] long (-1 text, -2 unprompted patch, k prompt k)
    vision_start: int  # index of the first <vpatch>
    grid_hw: Tuple[int, int]  # (h, w) patches

    @property
    def num_patches(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]


def build_sample(tokenizer, ids: TokenIds, grid_hw: Tuple[int, int], turns: Sequence[Tuple[str, Optional[str]]],
                 vp_patch_masks: Optional[torch.Tensor] = None, vp_ids: Optional[Sequence[int]] = None,
                 max_length: Optional[int] = None) -> PixelSAILSample:
    """Token ids / labels / prompt indices of one sample.

    Args:
        grid_hw: (h, w) patch grid of the image.
        turns: (question, answer) pairs; an answer of None ends the sequence after that user turn (a
            generation prefix; only allowed for the last turn). A forced answer start that generation
            continues: :func:`generation_prefix`.
        vp_patch_masks: bool [R, h, w], prompt masks on the patch grid, in overwrite order.
        vp_ids: prompt number k of each mask (default 0..R-1).
        max_length: truncate (the official 8192, vision included) -- error if that would cut the image.
    """
    h, w = grid_hw
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    input_ids = [ids.vision_start] + [ids.vision_patch] * (h * w) + [ids.vision_end]
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, (question, answer) in enumerate(turns):
        q = enc(user_turn_text(question))
        input_ids += q
        labels += [IGNORE_INDEX] * len(q)
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError("only the last turn may be open (answer None)")
            continue
        a = enc(answer) + [ids.eos]
        input_ids += a
        labels += a
    vp_index = torch.full((len(input_ids),), -1, dtype=torch.long)
    vp_index[1:1 + h * w] = -2
    if vp_patch_masks is not None and len(vp_patch_masks):
        if tuple(vp_patch_masks.shape[-2:]) != (h, w):
            raise ValueError(f"visual-prompt patch masks {tuple(vp_patch_masks.shape)} do not match the grid {(h, w)}")
        vp_ids = list(range(len(vp_patch_masks))) if vp_ids is None else list(vp_ids)
        if len(vp_ids) != len(vp_patch_masks):
            raise ValueError(f"{len(vp_ids)} prompt ids for {len(vp_patch_masks)} prompt masks")
        if vp_ids and not 0 <= min(vp_ids) <= max(vp_ids) < len(ids.prompts):
            raise ValueError(f"prompt ids must lie in [0, {len(ids.prompts)}), got {vp_ids}")
        patch = vp_index[1:1 + h * w]
        for k, m in zip(vp_ids, vp_patch_masks):
            patch[m.reshape(-1).bool()] = int(k)  # later prompts overwrite earlier ones
    if max_length is not None and len(input_ids) > max_length:
        if max_length < h * w + 2:
            raise ValueError(f"max_length {max_length} would cut the {h * w} vision tokens")
        input_ids, labels, vp_index = input_ids[:max_length], labels[:max_length], vp_index[:max_length]
    return PixelSAILSample(torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                           vp_index, 1, (h, w))


def generation_prefix(tokenizer, ids: TokenIds, grid_hw, question: str, answer_prefix: str = "",
                      vp_patch_masks=None, vp_ids=None) -> PixelSAILSample:
    """The prefix of a generation: image + user turn (+ a forced answer start, no eos)."""
    if not answer_prefix:
        return build_sample(tokenizer, ids, grid_hw, [(question, None)], vp_patch_masks, vp_ids)
    s = build_sample(tokenizer, ids, grid_hw, [(question, answer_prefix)], vp_patch_masks, vp_ids)
    return PixelSAILSample(s.input_ids[:-1], s.labels[:-1], s.vp_index[:-1], s.vision_start, s.grid_hw)


def position_ids_3d(length: int, vision_start: int, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """[3, length] (t, h, w) ids: text i -> (i, i, i); patch (r, c) -> (s, s + r, s + c) with s the
    first patch's index; the tokens after the image continue from (max id so far) + 1."""
    h, w = grid_hw
    s = vision_start
    pos = torch.arange(length).repeat(3, 1)
    if h * w:
        r = torch.arange(h).repeat_interleave(w)
        c = torch.arange(w).repeat(h)
        pos[0, s:s + h * w] = s
        pos[1, s:s + h * w] = s + r
        pos[2, s:s + h * w] = s + c
        nxt = s + max(h, w)  # max id of the block is s + max(h, w) - 1
        tail = torch.arange(length - (s + h * w))
        pos[:, s + h * w:] = nxt + tail
    return pos


@dataclasses.dataclass
class PixelSAILBatch:
    input_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    valid: torch.Tensor  # [B, L] bool, False = padding
    attention_mask: torch.Tensor  # [B, 1, L, L] bool, True = may attend
    position_ids: torch.Tensor  # [3, B, L]
    vp_index: torch.Tensor  # [B, L]
    patch_index: torch.Tensor  # [B, L] row into the concatenated patches, -1 elsewhere
    vision_start: torch.Tensor  # [B] index of each sample's first <vpatch> in the padded batch
    grid_hw: List[Tuple[int, int]]

    def to(self, device):
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def collate(samples: Sequence[PixelSAILSample], pad_id: int, padding_side: str = "right",
            vision_bidirectional: bool = True) -> PixelSAILBatch:
    """Pad and build masks / positions / patch indices (module docstring). ``padding_side="left"`` for
    generation (every prefix ends at the same column)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    B = len(samples)
    L = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    vp_index = torch.full((B, L), -1, dtype=torch.long)
    patch_index = torch.full((B, L), -1, dtype=torch.long)
    position_ids = torch.zeros((3, B, L), dtype=torch.long)
    valid = torch.zeros((B, L), dtype=torch.bool)
    block = torch.zeros((B, L), dtype=torch.bool)
    vision_start = torch.zeros(B, dtype=torch.long)
    offset = 0  # patches of the samples before b
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        o = 0 if padding_side == "right" else L - n
        input_ids[b, o:o + n] = s.input_ids
        labels[b, o:o + n] = s.labels
        vp_index[b, o:o + n] = s.vp_index
        valid[b, o:o + n] = True
        position_ids[:, b, o:o + n] = position_ids_3d(n, s.vision_start, s.grid_hw)
        vs = o + s.vision_start
        vision_start[b] = vs
        patch_index[b, vs:vs + s.num_patches] = torch.arange(offset, offset + s.num_patches)
        offset += s.num_patches
        if vision_bidirectional:
            block[b, vs - 1:vs + s.num_patches + 1] = True
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    attn = causal[None] | (block[:, :, None] & block[:, None, :])
    attn = attn & valid[:, None, :]
    attn = attn | torch.eye(L, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN)
    return PixelSAILBatch(input_ids, labels, valid, attn[:, None], position_ids, vp_index, patch_index,
                          vision_start, [s.grid_hw for s in samples])
