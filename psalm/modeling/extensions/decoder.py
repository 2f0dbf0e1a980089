"""``ExtendedPSALMDecoder``: the official decoder with extra scoring-head inputs (BEYOND THE PAPER).

Registered in ``TRANSFORMER_DECODER_REGISTRY``; selected with
``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME: "ExtendedPSALMDecoder"``, options under ``MODEL.EXTENSIONS``.
The mask head, the attention masks and every layer are the official ones
(:class:`~psalm.modeling.transformer_decoder.PSALMMultiScaleMaskedTransformerDecoder`); only what the
class / refer / region heads read changes, through the base class's ``head_input`` and ``sentence_head``:

* head mask pooling (``HEAD_MASK_POOLING``): at every prediction stage, a feature map ``F`` [B, C_p, h, w]
  given as ``pool_features`` (the mask features or a backbone map; :class:`ExtendedPSALM` passes it) is
  averaged under each query's own predicted mask, ``p_q = sum_x s_q(x) F(x) / (sum_x s_q(x) + 1)`` with
  ``s_q = sigmoid(mask logit)`` bilinearly resized to ``h x w`` (detached: the scoring losses do not move
  the masks), and the heads read ``decoder_norm(q) + head_pool_proj(LN(p_q))``. Parameters
  ``head_pool_norm``, ``head_pool_proj`` (C_p -> hidden_dim).
* head mask shape (``HEAD_MASK_SHAPE_GRID`` = k): each query's own detached soft mask (at the mask-feature
  resolution) resampled bilinearly at the k x k cell centres of its box (:func:`mask_shape_grid`); the heads
  also add ``head_shape_proj(grid)`` (k*k -> hidden_dim). The grid is scale- and position-normalised, so it
  tells the heads the silhouette (a square fills it, a diamond leaves the corners empty).
* ``REFER_AS_CLASS``: sentences are scored by ``class_head``; the decoder has no ``refer_head``.

The two head inputs add to the same tensor and may be combined. The mask head never reads them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..transformer_decoder import TRANSFORMER_DECODER_REGISTRY, PSALMMultiScaleMaskedTransformerDecoder

__all__ = ["ExtendedPSALMDecoder", "mask_shape_grid", "head_pool_channels"]


def head_pool_channels(cfg, input_shape: dict | None) -> int:
    """Channels ``C_p`` of the map named by ``MODEL.EXTENSIONS.HEAD_MASK_POOLING`` (0 when off)."""
    source = cfg.MODEL.EXTENSIONS.HEAD_MASK_POOLING
    if not source:
        return 0
    if source == "mask_features":
        return cfg.MODEL.SEM_SEG_HEAD.MASK_DIM
    if input_shape is not None and source in input_shape:
        return input_shape[source].channels
    known = sorted(input_shape) if input_shape is not None else "the backbone's features"
    raise ValueError(
        f"MODEL.EXTENSIONS.HEAD_MASK_POOLING={source!r}: expected '' (off), 'mask_features' or one of {known}"
    )


@TRANSFORMER_DECODER_REGISTRY.register()
class ExtendedPSALMDecoder(PSALMMultiScaleMaskedTransformerDecoder):
    """The official decoder + mask-aware scoring-head inputs / sentences scored as classes (module docstring)."""

    @configurable
    def __init__(
        self,
        in_channels: int,
        *,
        head_pool_source: str = "",
        head_pool_dim: int = 0,
        head_shape_grid: int = 0,
        refer_as_class: bool = False,
        **kwargs,
    ):
        """``kwargs``: the official decoder's arguments. ``head_pool_source`` names the map the caller passes
        as ``pool_features`` (``""`` = off, ``"mask_features"`` or a backbone feature), ``head_pool_dim`` its
        channels ``C_p``; ``head_shape_grid``: k of the shape grid (0 = off); ``refer_as_class``: sentences
        scored by ``class_head`` (no ``refer_head``). At least one of them must be on."""
        super().__init__(in_channels, **kwargs)
        hidden_dim = self.query_embed.weight.shape[1]
        if bool(head_pool_source) != bool(head_pool_dim):
            raise ValueError(
                f"head mask pooling needs both a source and its channels; got head_pool_source={head_pool_source!r}, "
                f"head_pool_dim={head_pool_dim}"
            )
        if head_shape_grid < 0:
            raise ValueError(
                f"MODEL.EXTENSIONS.HEAD_MASK_SHAPE_GRID={head_shape_grid} must be >= 0 (0 = off, k = a k x k grid)"
            )
        if not (head_pool_dim or head_shape_grid or refer_as_class):
            raise ValueError(
                "ExtendedPSALMDecoder with no extension on (MODEL.EXTENSIONS.HEAD_MASK_POOLING, HEAD_MASK_SHAPE_GRID, "
                "REFER_AS_CLASS) is the official decoder: select MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME "
                "'PSALMMultiScaleMaskedTransformerDecoder'"
            )
        self.head_pool_source = head_pool_source
        self.head_pool_dim = head_pool_dim
        if head_pool_dim:
            self.head_pool_norm = nn.LayerNorm(head_pool_dim)
            self.head_pool_proj = nn.Linear(head_pool_dim, hidden_dim)
        self.head_shape_grid = head_shape_grid
        if head_shape_grid:
            self.head_shape_proj = nn.Linear(head_shape_grid * head_shape_grid, hidden_dim)
        self.refer_as_class = bool(refer_as_class)
        if self.refer_as_class:
            del self.refer_head  # sentences are scored by class_head: no unused (or aliased) parameters

    @classmethod
    def from_config(cls, cfg, in_channels: int, input_shape: dict | None = None):
        """``input_shape``: the backbone's ``output_shape()``, needed when HEAD_MASK_POOLING names a backbone map."""
        ext = cfg.MODEL.EXTENSIONS
        return {
            **super().from_config(cfg, in_channels, input_shape),
            "head_pool_source": ext.HEAD_MASK_POOLING,
            "head_pool_dim": head_pool_channels(cfg, input_shape),
            "head_shape_grid": ext.HEAD_MASK_SHAPE_GRID,
            "refer_as_class": ext.REFER_AS_CLASS,
        }

    def forward(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        queries: torch.Tensor,
        refer_embeddings: torch.Tensor | None = None,
        class_embeddings: torch.Tensor | None = None,
        region_embeddings: list[torch.Tensor] | None = None,
        pool_features: torch.Tensor | None = None,
    ) -> dict:
        """The official ``forward`` (same arguments and outputs) plus ``pool_features`` [B, C_p, h, w] for
        head mask pooling (required when it is on, an error when it is off)."""
        B = queries.shape[0]
        if self.head_pool_dim and (pool_features is None or pool_features.shape[:2] != (B, self.head_pool_dim)):
            raise ValueError(
                f"head mask pooling (MODEL.EXTENSIONS.HEAD_MASK_POOLING={self.head_pool_source!r}) needs "
                f"pool_features [B={B}, {self.head_pool_dim}, h, w]; got "
                f"{None if pool_features is None else tuple(pool_features.shape)}"
            )
        if not self.head_pool_dim and pool_features is not None:
            raise ValueError("pool_features given, but head mask pooling is off (MODEL.EXTENSIONS.HEAD_MASK_POOLING)")
        conditions = {
            "refer": refer_embeddings,
            "classes": class_embeddings,
            "regions": region_embeddings,
            "pool_features": pool_features,
        }
        return self._decode(multi_scale_features, mask_features, queries, conditions)

    def head_input(self, decoded: torch.Tensor, pred_masks: torch.Tensor, conditions: dict) -> torch.Tensor:
        """``decoder_norm(q)`` [B, Q, D] plus the pooled and / or shape inputs (module docstring)."""
        if self.head_pool_dim:
            decoded = decoded + self.mask_pooled(pred_masks, conditions["pool_features"])
        if self.head_shape_grid:
            decoded = decoded + self.head_shape_proj(mask_shape_grid(pred_masks, self.head_shape_grid))
        return decoded

    def sentence_head(self) -> nn.Module:
        return self.class_head if self.refer_as_class else self.refer_head

    def mask_pooled(self, pred_masks: torch.Tensor, pool_features: torch.Tensor) -> torch.Tensor:
        """[B, Q, D]: ``head_pool_proj(LN(p_q))`` for ``pool_features`` [B, C_p, h, w] averaged under each
        query's (detached) soft mask ``sigmoid(pred_masks)`` [B, Q, H, W] resized to h x w (module docstring)."""
        logits = pred_masks.detach().float()
        if logits.shape[-2:] != pool_features.shape[-2:]:
            logits = F.interpolate(logits, size=pool_features.shape[-2:], mode="bilinear", align_corners=False)
        weights = logits.sigmoid().to(pool_features.dtype)
        pooled = torch.einsum("bqhw,bchw->bqc", weights, pool_features)
        pooled = pooled / (weights.sum(dim=(-2, -1)).unsqueeze(-1) + 1.0)
        return self.head_pool_proj(self.head_pool_norm(pooled))


def mask_shape_grid(pred_masks: torch.Tensor, k: int) -> torch.Tensor:
    """[B, Q, k*k]: each (detached) soft mask ``sigmoid(pred_masks)`` [B, Q, H, W] sampled bilinearly at the
    k x k cell centres of its box, the pixel extent of ``sigmoid >= 0.5`` (the whole map when that is empty).

    Coordinates: pixel ``i`` covers ``[i, i + 1)``; a box spans ``[min, max + 1)`` on each axis, and cell
    ``j`` of k is sampled at ``min + (j + 0.5) * (max + 1 - min) / k`` (``grid_sample`` with
    ``align_corners=False``, border padding)."""
    B, Q, H, W = pred_masks.shape
    probs = pred_masks.detach().float().sigmoid()
    inside = probs >= 0.5
    centres = (torch.arange(k, device=probs.device, dtype=probs.dtype) + 0.5) / k  # [k]
    coords = []
    for axis, size in ((-2, W), (-1, H)):  # any over rows -> columns (x); any over columns -> rows (y)
        hit = inside.any(dim=axis)  # [B, Q, size]
        idx = torch.arange(size, device=probs.device, dtype=probs.dtype)
        lo = torch.where(hit, idx, torch.full_like(idx, float(size))).amin(-1)
        hi = torch.where(hit, idx, torch.full_like(idx, -1.0)).amax(-1) + 1
        empty = ~hit.any(-1)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.full_like(hi, float(size)), hi)
        pix = lo[..., None] + centres * (hi - lo)[..., None]  # [B, Q, k] pixel coordinates
        coords.append(pix * 2.0 / size - 1.0)  # grid_sample's normalised coordinates (align_corners=False)
    gx, gy = coords
    grid = torch.stack(
        (gx[:, :, None, :].expand(B, Q, k, k), gy[:, :, :, None].expand(B, Q, k, k)), dim=-1
    )  # [B, Q, k(y), k(x), 2]
    sampled = F.grid_sample(
        probs.reshape(B * Q, 1, H, W), grid.reshape(B * Q, k, k, 2), mode="bilinear",
        padding_mode="border", align_corners=False,
    )  # [B*Q, 1, k, k]
    return sampled.reshape(B, Q, k * k).to(pred_masks.dtype)
