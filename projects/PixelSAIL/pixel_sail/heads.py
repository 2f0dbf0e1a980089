"""Pixel-SAIL's added heads (spec B1.2): up-sampling blocks, projectors and the einsum mask head.

Shapes: D LLM hidden size, ``in_dim = min(D, PRE_PROJECTOR_MAX_DIM)``, C = ``SEG_HIDDEN_DIM``, h x w the
patch grid. State-dict names follow the authors' module tree (``image_feature_pre_projector.{0,2}``,
``upsample_blocks.{i}.{0 ConvT, 2.depthwise, 2.pointwise, 3.ln}``, ``image_feature_projector.{0,2}``,
``seg_token_projector.{0,2}``).
"""
from __future__ import annotations

import math
from typing import List

import torch
from detectron2.config import configurable
from torch import nn

__all__ = ["DepthwiseSeparableConv", "ChannelLayerNorm", "num_upsample_blocks", "PixelSAILMaskHead"]


class DepthwiseSeparableConv(nn.Module):
    """Depth-wise 3x3 + point-wise 1x1 conv, [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of [B, C, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.ln = nn.LayerNorm(channels)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def num_upsample_blocks(patch_size: int, output_stride: int) -> int:
    """x2 blocks from stride p to ``output_stride``: p=16 -> 3 blocks for stride 2 (the code's count), 2
    for stride 4 (the paper's one-quarter)."""
    ratio = patch_size / output_stride
    k = int(round(math.log2(ratio))) if ratio >= 1 else -1
    if k < 0 or 2 ** k != ratio:
        raise ValueError(f"UPSAMPLE_OUTPUT_STRIDE {output_stride} must be the patch size {patch_size} divided by a power of 2")
    return k


class PixelSAILMaskHead(nn.Module):
    """Vision-token features + [SEG] states -> mask logits.

    ``forward(vision_states, seg_states)``: lists over images of [h, w, D] and [n, D] ->
    list of [n, h * p / s, w * p / s] logits (s = output stride). ``image_features(vision_states)``
    alone gives the F_mask maps [C, H/s, W/s] (distillation reads them).
    """

    @configurable
    def __init__(self, *, hidden_size: int, patch_size: int, output_stride: int = 2, seg_hidden_dim: int = 512,
                 pre_projector_max_dim: int = 1024):
        super().__init__()
        self.patch_size, self.output_stride = int(patch_size), int(output_stride)
        in_dim = min(hidden_size, pre_projector_max_dim)
        self.in_dim = in_dim
        if hidden_size > pre_projector_max_dim:
            self.image_feature_pre_projector = nn.Sequential(
                nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True), nn.Linear(hidden_size, in_dim))
        else:
            self.image_feature_pre_projector = None
        self.upsample_blocks = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(in_dim, in_dim, 2, stride=2), nn.GELU(), DepthwiseSeparableConv(in_dim),
                          ChannelLayerNorm(in_dim))
            for _ in range(num_upsample_blocks(patch_size, output_stride))
        ])
        self.image_feature_projector = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, seg_hidden_dim), nn.Dropout(0.0))
        self.seg_token_projector = nn.Sequential(
            nn.Linear(hidden_size, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, seg_hidden_dim))

    @classmethod
    def from_config(cls, cfg, hidden_size: int):
        ps = cfg.MODEL.PIXEL_SAIL
        return dict(hidden_size=hidden_size, patch_size=ps.PATCH_SIZE, output_stride=ps.UPSAMPLE_OUTPUT_STRIDE,
                    seg_hidden_dim=ps.SEG_HIDDEN_DIM, pre_projector_max_dim=ps.PRE_PROJECTOR_MAX_DIM)

    def image_features(self, vision_states: torch.Tensor) -> torch.Tensor:
        """[h, w, D] -> F_mask [C, h * p / s, w * p / s]."""
        x = vision_states
        if self.image_feature_pre_projector is not None:
            x = self.image_feature_pre_projector(x)
        x = x.permute(2, 0, 1)[None]  # [1, in_dim, h, w]
        for block in self.upsample_blocks:
            x = block(x)
        return self.image_feature_projector(x[0].permute(1, 2, 0)).permute(2, 0, 1)

    def forward(self, vision_states: List[torch.Tensor], seg_states: List[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for v, s in zip(vision_states, seg_states):
            feats = self.image_features(v)  # [C, H', W']
            queries = self.seg_token_projector(s)  # [n, C]
            out.append(torch.einsum("qc,chw->qhw", queries, feats))
        return out
