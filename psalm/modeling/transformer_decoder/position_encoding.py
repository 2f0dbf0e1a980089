"""Sine positional encoding of a 2-D feature map (DETR / Mask2Former ``PositionEmbeddingSine``)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of normalised (y, x) pixel positions; used by the pixel decoder and the decoder.

    ``forward(x [B, C, H, W], mask [B, H, W] | None) -> pos [B, 2 * num_pos_feats, H, W]`` with the
    y-encoding in the first ``num_pos_feats`` channels. ``mask`` marks padding (True = padding); None
    means no padding. The encoding is computed in float32 and cast to ``x.dtype``, as in the official
    code (an fp32 "island" even in fp64 runs), and it never needs gradients.
    """

    def __init__(
        self, num_pos_feats: int = 64, temperature: float = 10000.0, normalize: bool = True, scale: float | None = None
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.zeros((x.shape[0], x.shape[2], x.shape[3]), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave: channel 2i = sin, 2i+1 = cos of the same frequency
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}"
