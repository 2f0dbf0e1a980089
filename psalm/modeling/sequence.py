"""One sequence assembler: tokenised prompts + embeddings -> the LLM's ``inputs_embeds`` and index tensors.

Each placeholder of a :class:`~psalm.data.prompt.TokenizedPrompt` is replaced, in order, by
(official ``concat_image_seg_cls_embeds``):

==============  ======================================================  ============================
placeholder     replaced by                                             index tensor set on the span
==============  ======================================================  ============================
``<image>``     the image tokens [N_img, H] of the sample               (none)
``<seg>``       the Q mask tokens [Q, H] (``PSALM.mask_tokens``)         ``mask_token_positions``
``<cls>`` (k)   ``embed_tokens(class_token_ids[k-1])`` (name + [SEG])    ``class_span_ids`` = k (1-based)
``<refer>``     ``embed_tokens(refer_token_ids)`` (expression + [SEG])   ``refer_span_mask`` = True
``<region>`` j  the pooled visual-prompt feature j [H]                   ``region_positions``
text            ``embed_tokens(ids)``                                    (none)
==============  ======================================================  ============================

Every spliced position gets the label ``IGNORE_INDEX``; text positions keep the prompt's labels.
Sequences are right padded (``padding_side="left"`` is available for batched generation) with zero
embeddings, label ``IGNORE_INDEX`` and index 0 / False.

Attention mask: the official code builds ``[True] * (L_b - L_ids) + (ids != pad) + [False] * align``
for each sample, where ``L_b`` is the sample's spliced length including its id-level right padding.
Because all splicing happens before that padding, the mask is True exactly on the sample's first
``len_b`` (spliced, unpadded) positions and False after: that is what is built here (a test checks
the equivalence on a padded batch). The official code embeds id-level pad tokens as
``embed_tokens([PAD])`` where this module uses zeros; padded positions are masked out and never read,
so real positions are unaffected.

All text, class and refer tokens of the batch go through ONE ``embed_tokens`` call, and the
sequence is produced by ONE gather from a table of all sources, so gradients reach
``embed_tokens``, the image tokens, the mask tokens and the region features.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from psalm.data.prompt import (
    CLS_TOKEN_INDEX,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    REFER_TOKEN_INDEX,
    REGION_TOKEN_INDEX,
    SEG_TOKEN_INDEX,
    TokenizedPrompt,
)

__all__ = ["AssembledSequence", "SequenceAssembler"]


@dataclasses.dataclass
class AssembledSequence:
    """The LLM input of a batch and where every spliced piece sits (L = longest spliced length).

    Attributes:
        inputs_embeds: [B, L, H].
        attention_mask: [B, L] bool, True on real positions.
        labels: [B, L] long, ``IGNORE_INDEX`` on spliced and padded positions.
        lengths: [B] long, real (unpadded) length of each sequence.
        mask_token_positions: [B, Q] long, positions of the mask tokens; ``None`` if no prompt has
            ``<seg>`` (language tasks).
        class_span_ids: [B, L] long, k (1-based prompt-order class index) on the k-th class span, 0 elsewhere.
        refer_span_mask: [B, L] bool, True on the referring-expression span.
        region_positions: B tensors [R_b] long, positions of the region tokens (in region order).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    mask_token_positions: torch.Tensor | None
    class_span_ids: torch.Tensor
    refer_span_mask: torch.Tensor
    region_positions: list[torch.Tensor]

    @property
    def mask_token_mask(self) -> torch.Tensor:
        """[B, L] bool, True on the mask tokens (official ``seg_query_mask``)."""
        out = torch.zeros_like(self.attention_mask)
        if self.mask_token_positions is not None:
            out.scatter_(1, self.mask_token_positions, True)
        return out

    @property
    def region_token_mask(self) -> torch.Tensor:
        """[B, L] bool, True on the region tokens (official ``region_embedding_masks``)."""
        out = torch.zeros_like(self.attention_mask)
        for b, pos in enumerate(self.region_positions):
            out[b, pos] = True
        return out


class SequenceAssembler:
    """Splices image tokens, mask tokens, class / refer spans and region features into the prompts.

    Args:
        padding_side: ``"right"`` (official; training and segmentation) or ``"left"`` (batched
            ``generate``).
    """

    def __init__(self, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.padding_side = padding_side

    def __call__(
        self,
        prompts: Sequence[TokenizedPrompt],
        embed_tokens: nn.Module,
        image_tokens: torch.Tensor | None = None,
        mask_tokens: torch.Tensor | None = None,
        region_features: Sequence[torch.Tensor] | None = None,
    ) -> AssembledSequence:
        """Assemble a batch.

        Args:
            prompts: B tokenised prompts.
            embed_tokens: the LLM's input embedding (``llm.get_input_embeddings()``).
            image_tokens: [B, N_img, H] projector output (required if a prompt has ``<image>``).
            mask_tokens: [Q, H] (required if a prompt has ``<seg>``).
            region_features: B tensors [R_b, H] (required if a prompt has ``<region>``; R_b must equal
                the prompt's ``num_regions``).

        Returns:
            :class:`AssembledSequence`.
        """
        if len(prompts) == 0:
            raise ValueError("no prompts to assemble")
        B = len(prompts)
        if image_tokens is not None and image_tokens.shape[0] != B:
            raise ValueError(f"image_tokens has batch {image_tokens.shape[0]} for {B} prompts")
        if region_features is not None and len(region_features) != B:
            raise ValueError(f"region_features has {len(region_features)} entries for {B} prompts")

        # Source table rows: [all token ids embedded] [image tokens] [mask tokens] [region feats] [zero]
        token_ids: list[torch.Tensor] = []
        n_tok = 0
        n_img = 0 if image_tokens is None else image_tokens.shape[1]
        q = 0 if mask_tokens is None else mask_tokens.shape[0]
        region_offsets, n_reg = [], 0
        for b in range(B):
            region_offsets.append(n_reg)
            n_reg += 0 if region_features is None else region_features[b].shape[0]

        # per-sample segment lists: (kind, payload, label tensor or None)
        plans = []
        for b, p in enumerate(prompts):
            ids, labels = p.input_ids, p.labels
            if ids.dim() != 1 or labels.shape != ids.shape:
                raise ValueError(f"sample {b}: input_ids / labels must be 1-d of the same length")
            ph = torch.nonzero(ids < 0).flatten().tolist()
            counts = {
                k: int((ids == k).sum())
                for k in (IMAGE_TOKEN_INDEX, SEG_TOKEN_INDEX, CLS_TOKEN_INDEX, REGION_TOKEN_INDEX, REFER_TOKEN_INDEX)
            }
            self._check_sample(b, p, counts, image_tokens, mask_tokens, region_features)
            segs, start, cls_k, reg_j = [], 0, 0, 0
            for pos in ph + [len(ids)]:
                if pos > start:  # text run
                    token_ids.append(ids[start:pos])
                    segs.append(("text", (n_tok, pos - start), labels[start:pos]))
                    n_tok += pos - start
                if pos == len(ids):
                    break
                kind = int(ids[pos])
                if kind == IMAGE_TOKEN_INDEX:
                    segs.append(("image", b, None))
                elif kind == SEG_TOKEN_INDEX:
                    segs.append(("mask", None, None))
                elif kind == CLS_TOKEN_INDEX:
                    span = p.class_token_ids[cls_k]
                    cls_k += 1
                    token_ids.append(span)
                    segs.append(("cls", (n_tok, len(span), cls_k), None))
                    n_tok += len(span)
                elif kind == REFER_TOKEN_INDEX:
                    span = p.refer_token_ids
                    token_ids.append(span)
                    segs.append(("refer", (n_tok, len(span)), None))
                    n_tok += len(span)
                elif kind == REGION_TOKEN_INDEX:
                    segs.append(("region", region_offsets[b] + reg_j, None))
                    reg_j += 1
                else:
                    raise ValueError(f"sample {b}: unknown placeholder id {kind} at position {pos}")
                start = pos + 1
            plans.append(segs)

        weight = embed_tokens.weight
        device = weight.device
        all_ids = torch.cat(token_ids).to(device) if token_ids else torch.zeros(0, dtype=torch.long, device=device)
        text_embeds = embed_tokens(all_ids)
        dtype, hidden = text_embeds.dtype, text_embeds.shape[-1]
        sources = [text_embeds]
        img_base = n_tok
        if image_tokens is not None:
            self._check_hidden("image_tokens", image_tokens.shape[-1], hidden)
            sources.append(image_tokens.reshape(-1, hidden).to(device=device, dtype=dtype))
        mask_base = img_base + B * n_img
        if mask_tokens is not None:
            self._check_hidden("mask_tokens", mask_tokens.shape[-1], hidden)
            sources.append(mask_tokens.to(device=device, dtype=dtype))
        reg_base = mask_base + q
        if region_features is not None:
            for r in region_features:
                self._check_hidden("region_features", r.shape[-1], hidden)
            sources.append(torch.cat([r.reshape(-1, hidden) for r in region_features]).to(device=device, dtype=dtype))
        zero_row = reg_base + n_reg
        sources.append(text_embeds.new_zeros(1, hidden))
        table = torch.cat(sources, dim=0)

        # per-sample index / label / span tensors (CPU, integer work), then one gather
        rows, labs, cls_ids, refer, mask_pos, region_pos = [], [], [], [], [], []
        for b, segs in enumerate(plans):
            r, lab, cid, ref, mpos, rpos = [], [], [], [], None, []
            length = 0
            for kind, payload, seg_labels in segs:
                if kind == "text":
                    s, n = payload
                    r.append(torch.arange(s, s + n))
                    lab.append(seg_labels)
                    cid.append(torch.zeros(n, dtype=torch.long))
                    ref.append(torch.zeros(n, dtype=torch.bool))
                else:
                    if kind == "image":
                        idx = torch.arange(img_base + payload * n_img, img_base + (payload + 1) * n_img)
                    elif kind == "mask":
                        idx = torch.arange(mask_base, mask_base + q)
                        mpos = torch.arange(length, length + q)
                    elif kind == "cls":
                        idx = torch.arange(payload[0], payload[0] + payload[1])
                    elif kind == "refer":
                        idx = torch.arange(payload[0], payload[0] + payload[1])
                    else:  # region
                        idx = torch.tensor([reg_base + payload])
                        rpos.append(length)
                    n = len(idx)
                    r.append(idx)
                    lab.append(torch.full((n,), IGNORE_INDEX, dtype=torch.long))
                    cid.append(torch.full((n,), payload[2] if kind == "cls" else 0, dtype=torch.long))
                    ref.append(torch.full((n,), kind == "refer", dtype=torch.bool))
                length += len(r[-1])
            rows.append(torch.cat(r))
            labs.append(torch.cat(lab))
            cls_ids.append(torch.cat(cid))
            refer.append(torch.cat(ref))
            mask_pos.append(mpos)
            region_pos.append(torch.tensor(rpos, dtype=torch.long))

        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        L = int(lengths.max())
        index = torch.full((B, L), zero_row, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        class_span_ids = torch.zeros(B, L, dtype=torch.long)
        refer_span_mask = torch.zeros(B, L, dtype=torch.bool)
        attention_mask = torch.zeros(B, L, dtype=torch.bool)
        offsets = []
        for b in range(B):
            n = int(lengths[b])
            off = 0 if self.padding_side == "right" else L - n
            offsets.append(off)
            index[b, off : off + n] = rows[b]
            labels[b, off : off + n] = labs[b]
            class_span_ids[b, off : off + n] = cls_ids[b]
            refer_span_mask[b, off : off + n] = refer[b]
            attention_mask[b, off : off + n] = True

        has_mask = [m is not None for m in mask_pos]
        if any(has_mask) and not all(has_mask):
            raise ValueError("a batch mixes prompts with and without <seg> (mask tokens); keep one task kind per batch")
        mask_token_positions = (
            torch.stack([m + o for m, o in zip(mask_pos, offsets)]).to(device) if all(has_mask) else None
        )
        inputs_embeds = table[index.to(device)]
        return AssembledSequence(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.to(device),
            labels=labels.to(device),
            lengths=lengths.to(device),
            mask_token_positions=mask_token_positions,
            class_span_ids=class_span_ids.to(device),
            refer_span_mask=refer_span_mask.to(device),
            region_positions=[(p + o).to(device) for p, o in zip(region_pos, offsets)],
        )

    @staticmethod
    def _check_hidden(name: str, got: int, want: int) -> None:
        if got != want:
            raise ValueError(f"{name} have hidden size {got}, the LLM embeddings {want}")

    @staticmethod
    def _check_sample(b, p, counts, image_tokens, mask_tokens, region_features) -> None:
        if counts[IMAGE_TOKEN_INDEX] > 1 or counts[SEG_TOKEN_INDEX] > 1:
            raise ValueError(f"sample {b}: at most one <image> and one <seg> per prompt (official), got {counts}")
        if counts[IMAGE_TOKEN_INDEX] and image_tokens is None:
            raise ValueError(f"sample {b}: the prompt has <image> but no image_tokens were given")
        if counts[SEG_TOKEN_INDEX] and mask_tokens is None:
            raise ValueError(f"sample {b}: the prompt has <seg> but no mask_tokens were given")
        if counts[CLS_TOKEN_INDEX] != p.num_classes:
            raise ValueError(
                f"sample {b}: {counts[CLS_TOKEN_INDEX]} <cls> placeholders but {p.num_classes} class spans"
            )
        if counts[REFER_TOKEN_INDEX] != (0 if p.refer_token_ids is None else 1):
            raise ValueError(
                f"sample {b}: {counts[REFER_TOKEN_INDEX]} <refer> placeholders; need exactly one with refer_token_ids"
            )
        n_regions = counts[REGION_TOKEN_INDEX]
        if n_regions or region_features is not None:
            got = None if region_features is None else region_features[b].shape[0]
            if got != n_regions:
                raise ValueError(f"sample {b}: {n_regions} <region> placeholders but {got} region features")
