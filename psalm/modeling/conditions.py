"""Reading the conditions from the LLM, and pooling visual prompts into region tokens.

Output side (hidden states ``h`` [B, L, H] after the LLM's final LayerNorm; the index tensors come
from :class:`~psalm.modeling.sequence.AssembledSequence`):

* :func:`gather_mask_tokens`: h at the Q mask-token positions -> [B, Q, H] (then
  ``mask_token_projector``);
* :func:`category_condition`: mean of h over each class span **including** its trailing ``[SEG]``,
  in prompt order, then put back into canonical order when the classes were shuffled -> [B, K+1, H]
  (then ``class_projector``);
* :func:`sentence_condition`: ``MODEL.PSALM.REFER_POOLING`` = ``"mean"`` over the whole refer span
  (expression + ``[SEG]``; official) or ``"last"`` = h at the span's trailing ``[SEG]`` (paper)
  -> [B, 1, H] (then ``refer_projector``);
* :func:`gather_region_tokens`: h at each region token -> B tensors [R_b, H] (then ``region_projector``).

Input side: :class:`RegionPooler` turns each binary visual-prompt mask into one H-dimensional token
from the square map of image tokens (see its docstring for the two modes).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .point_sampling import point_sample

__all__ = [
    "gather_mask_tokens",
    "category_condition",
    "restore_class_order",
    "sentence_condition",
    "gather_region_tokens",
    "RegionPooler",
]


def gather_mask_tokens(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """h [B, L, H] at ``positions`` [B, Q] -> [B, Q, H]."""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def restore_class_order(embeddings: torch.Tensor, restore_index: torch.Tensor) -> torch.Tensor:
    """[B, K+1, C] in prompt order -> canonical order; ``restore_index`` [B, K+1] or [K+1]
    (``TokenizedPrompt.restore_index``: canonical class j sits at prompt position ``restore_index[j]``)."""
    if restore_index.dim() == 1:
        restore_index = restore_index.unsqueeze(0).expand(embeddings.shape[0], -1)
    idx = restore_index.to(embeddings.device).unsqueeze(-1).expand(-1, -1, embeddings.shape[-1])
    return embeddings.gather(1, idx)


def category_condition(
    hidden: torch.Tensor, class_span_ids: torch.Tensor, restore_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of h over each class span (name tokens + ``[SEG]``) -> [B, K+1, H].

    Args:
        hidden: [B, L, H].
        class_span_ids: [B, L] long, k = 1..K+1 on the k-th span (prompt order), 0 elsewhere. Every
            sample must have the same K+1 non-empty spans.
        restore_index: optional [B, K+1] / [K+1]; when given, the result is reordered to canonical
            order (:func:`restore_class_order`), otherwise it stays in prompt order.
    """
    num = int(class_span_ids.max()) if class_span_ids.numel() else 0
    if num == 0:
        raise ValueError("no class span in the batch (class_span_ids is all 0); is this a category prompt?")
    onehot = nn.functional.one_hot(class_span_ids, num + 1)[..., 1:].to(hidden.dtype)  # [B, L, K+1]
    counts = onehot.sum(1)  # [B, K+1]
    if bool((counts == 0).any()):
        raise ValueError(
            f"some class spans are empty (per-sample span lengths {counts.tolist()}); all samples "
            "of a category batch need the same number of classes"
        )
    pooled = torch.bmm((onehot / counts.unsqueeze(1)).transpose(1, 2), hidden)
    return pooled if restore_index is None else restore_class_order(pooled, restore_index)


def sentence_condition(hidden: torch.Tensor, refer_span_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pool h over the referring span -> [B, 1, H].

    ``pooling="mean"``: mean over the whole span (expression + ``[SEG]``; official, compat);
    ``"last"``: h at the span's last position, the trailing ``[SEG]`` (the paper's [REF] output).
    """
    counts = refer_span_mask.sum(1)
    if bool((counts == 0).any()):
        raise ValueError(f"a sample has no refer span (span lengths {counts.tolist()}); is this a referring prompt?")
    if pooling == "mean":
        w = refer_span_mask.to(hidden.dtype) / counts.unsqueeze(1).to(hidden.dtype)
        return torch.bmm(w.unsqueeze(1), hidden)
    if pooling == "last":
        pos = torch.arange(refer_span_mask.shape[1], device=refer_span_mask.device)
        last = torch.where(refer_span_mask, pos, -1).max(1).values  # [B]
        return gather_mask_tokens(hidden, last.unsqueeze(1))
    raise ValueError(f"MODEL.PSALM.REFER_POOLING must be 'mean' or 'last', got {pooling!r}")


def gather_region_tokens(hidden: torch.Tensor, region_positions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """h at each sample's region-token positions -> B tensors [R_b, H]."""
    if len(region_positions) != hidden.shape[0]:
        raise ValueError(f"{len(region_positions)} position lists for a batch of {hidden.shape[0]}")
    return [h[p.to(h.device)] for h, p in zip(hidden, region_positions)]


def _interp_matrix(size: int, grid: int, dtype, device) -> torch.Tensor:
    """[size, grid]: weights of the linear interpolation of a ``grid``-point axis at the official
    sampling coordinates ``p / size * (grid - 1)`` of the ``size`` pixels."""
    pos = torch.arange(size, device=device, dtype=torch.float64) / size * (grid - 1)
    lo = pos.floor().long().clamp(max=grid - 1)
    hi = (lo + 1).clamp(max=grid - 1)
    frac = pos - lo
    w = torch.zeros(size, grid, dtype=torch.float64, device=device)
    w.scatter_add_(1, lo.unsqueeze(1), (1 - frac).unsqueeze(1))
    w.scatter_add_(1, hi.unsqueeze(1), frac.unsqueeze(1))
    return w.to(dtype)


class RegionPooler(nn.Module):
    """One token per visual prompt: pool the square image-token map under each region mask.

    Modes (``MODEL.PSALM.REGION_POOLING``):

    * ``"sample_points"`` (official, compat): take the mask's pixel coordinates ``(row / H, col / W)``
      on the PADDED mask (H x W = S x S), choose ``num_points`` of them — all of them when there are
      exactly ``num_points``, a random subset without replacement when more, all plus random repeats
      when fewer — bilinearly sample the h x w map there with ``grid_sample(align_corners=True)``
      **in fp32** (pixel p lands on map coordinate ``p / H * (h - 1)``), cast back, and average.
      Randomness: in training mode torch's global RNG (as the official code); in eval mode a local
      ``torch.Generator`` seeded with ``seed + j`` for the j-th region of each sample, so inference
      is deterministic and independent of the batch composition. Recorded points can be injected.
    * ``"mask_average"``: the exact average, over ALL mask pixels, of the same bilinear
      interpolation (the map upsampled to H x W at the official coordinates, then mask-average
      pooled: the paper's description). Computed exactly without upsampling: with ``A_y`` [H, h] and
      ``A_x`` [W, w] the interpolation matrices, ``feature = sum_ij (A_y^T M A_x)_ij F_ij / |M|``.
      With exactly ``num_points`` mask pixels both modes agree.

    Args:
        mode: ``"sample_points"`` or ``"mask_average"``.
        num_points: points per region (official 256).
        seed: eval-mode seed (``MODEL.PSALM.REGION_SEED``).
    """

    def __init__(self, mode: str = "sample_points", num_points: int = 256, seed: int = 0):
        super().__init__()
        if mode not in ("sample_points", "mask_average"):
            raise ValueError(f"MODEL.PSALM.REGION_POOLING must be 'sample_points' or 'mask_average', got {mode!r}")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.mode, self.num_points, self.seed = mode, int(num_points), int(seed)

    @classmethod
    def from_config(cls, cfg) -> "RegionPooler":
        p = cfg.MODEL.PSALM
        return cls(p.REGION_POOLING, p.REGION_NUM_POINTS, p.REGION_SEED)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, num_points={self.num_points}, seed={self.seed}"

    def forward(
        self,
        image_tokens: torch.Tensor,
        region_masks: Sequence[torch.Tensor],
        points: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Pool the regions of every sample.

        Args:
            image_tokens: [B, N, H], N = h * h (row-major square map).
            region_masks: B bool tensors [R_b, S_h, S_w] (padded input size).
            points: optional B tensors [R_b, P, 2] of ``(row / S_h, col / S_w)`` coordinates to use
                instead of sampling (``sample_points`` mode only; for parity with recorded runs).

        Returns:
            B tensors [R_b, H] in ``image_tokens``' dtype.
        """
        B, N, C = image_tokens.shape
        if len(region_masks) != B:
            raise ValueError(f"{len(region_masks)} region-mask sets for a batch of {B}")
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"image tokens must form a square map, got N={N}")
        fmap = image_tokens.reshape(B, side, side, C).permute(0, 3, 1, 2)  # [B, C, h, w]
        for b, m in enumerate(region_masks):
            if m.dim() != 3:
                raise ValueError(f"region_masks[{b}] must be [R, H, W], got shape {tuple(m.shape)}")
        # pixels per region, for all samples at once: ONE device-to-host copy (also the split sizes)
        pixel_counts = torch.cat([(m.flatten(1) != 0).sum(1) for m in region_masks]).tolist() if region_masks else []
        sizes = [m.shape[0] for m in region_masks]
        start = 0
        for b, r in enumerate(sizes):
            empty = [j for j, n in enumerate(pixel_counts[start : start + r]) if n == 0]
            start += r
            if empty:
                raise ValueError(f"region mask(s) {empty} of sample {b} have no pixels; drop empty visual prompts")
        if points is not None and self.mode != "sample_points":
            raise ValueError("injected points are only used by the 'sample_points' mode")
        if sum(sizes) == 0:
            return [image_tokens.new_zeros(0, C) for _ in range(B)]
        if self.mode == "mask_average":
            return [self._mask_average(fmap[b], m) for b, m in enumerate(region_masks)]
        if points is None:
            start, points = 0, []
            for m, r in zip(region_masks, sizes):
                points.append(self._sample(m, pixel_counts[start : start + r]))
                start += r
        grid = torch.cat([p.to(fmap.device) for p in points]).flip(-1)  # (x, y) = (col / W, row / H)
        if grid.shape[0] != sum(sizes):
            raise ValueError(f"injected points cover {grid.shape[0]} regions, the masks {sum(sizes)}")
        maps = fmap.repeat_interleave(torch.tensor(sizes, device=fmap.device), dim=0)
        sampled = point_sample(maps.float(), grid.float(), mode="bilinear", align_corners=True)  # [M, C, P]
        pooled = sampled.to(image_tokens.dtype).mean(-1)
        return list(pooled.split(sizes))

    def _sample(self, masks: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """[R, H, W] bool (``counts``: pixels per region) -> [R, P, 2] sampled ``(row / H, col / W)``
        coordinates (float64)."""
        R, H, W = masks.shape
        P = self.num_points
        coords = masks.nonzero()  # [n_total, 3] (region, row, col), row-major within each region
        rc = coords[:, 1:].double() / torch.tensor([H, W], dtype=torch.float64, device=coords.device)
        out = []
        # eval mode: region j draws from a CPU generator seeded with seed + j (one object, re-seeded)
        gen = None if self.training else torch.Generator()
        for j, part in enumerate(rc.split(counts)):
            n = part.shape[0]
            if gen is not None:
                gen.manual_seed(self.seed + j)
            if n == P:
                idx = torch.arange(n)
            elif n > P:
                idx = torch.randperm(n, generator=gen)[:P]
            else:
                idx = torch.cat([torch.arange(n), torch.randint(0, n, (P - n,), generator=gen)])
            out.append(part[idx.to(part.device)])
        return torch.stack(out) if out else rc.new_zeros(0, P, 2)

    def _mask_average(self, fmap: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """fmap [C, h, w], masks [R, H, W] -> [R, C], exact mask average of the interpolated map."""
        C, h, w = fmap.shape
        R, H, W = masks.shape
        dtype = torch.promote_types(fmap.dtype, torch.float32)
        ay = _interp_matrix(H, h, dtype, fmap.device)  # [H, h]
        ax = _interp_matrix(W, w, dtype, fmap.device)  # [W, w]
        m = masks.to(dtype)
        weights = torch.einsum("hi,rhw,wj->rij", ay, m, ax) / m.flatten(1).sum(1).view(R, 1, 1)
        return torch.einsum("rij,cij->rc", weights, fmap.to(dtype)).to(fmap.dtype)
