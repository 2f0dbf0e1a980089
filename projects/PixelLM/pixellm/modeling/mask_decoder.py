"""PixelLM's lightweight pixel decoder: a SAM-style two-way decoder run once per feature scale.

Built from transformers' SAM blocks where they compute the same function as the official modules
(proved on the golden data, ``tests/test_golden.py``): ``SamTwoWayTransformer`` (per level),
``SamPositionalEmbedding`` (random-Fourier PE), ``SamLayerNorm`` (LayerNorm2d), ``SamFeedForward``
(hypernetwork / IoU MLPs). The multi-scale wiring is PixelLM's (``mask_decoder_multi_scale.py``):

* level 0: tokens ``[iou, mask x 4, h^0] + level_embed[0]``, src = f^0 + dense prompt, PE = the
  prompt encoder's grid PE; TwoWay[0] -> ``output_upscaling`` (x2) -> m^0 [K, 1, 2G, 2G];
* level l >= 1: src = ``upsample_2x``(f^l) modulated by ``sigmoid(mean_c m^{l-1}) + 1``, dense prompt
  bilinearly resized, PE = ``pe1``; TwoWay[l] -> m^l [K, 1, 4G, 4G];
* only mask token 0 is used (``multimask_output=False``).

Tensor names: K targets of one image, D decoder width, G the CLIP grid (32 for 448 input).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import (
    SamFeedForward,
    SamLayerNorm,
    SamPositionalEmbedding,
    SamTwoWayTransformer,
)

__all__ = ["PositionEmbeddingGrid", "PixelLMPromptEncoder", "MultiScaleMaskDecoder", "neck"]


class _PEConfig:
    def __init__(self, num_pos_feats: int, scale: float = 1.0):
        self.num_pos_feats, self.scale = num_pos_feats, scale


class PositionEmbeddingGrid(nn.Module):
    """SAM's random-Fourier PE of an h x w grid: [D, h, w] with D = 2 * num_pos_feats.

    The Gaussian matrix is a frozen parameter (a persistent buffer in SAM; never trained).
    """

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.pe = SamPositionalEmbedding(_PEConfig(num_pos_feats))
        self.pe.positional_embedding.requires_grad_(False)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        gauss = self.pe.positional_embedding
        grid = torch.ones((h, w), device=gauss.device, dtype=gauss.dtype)
        y = (grid.cumsum(0) - 0.5) / h
        x = (grid.cumsum(1) - 0.5) / w
        return self.pe(torch.stack([x, y], dim=-1)).permute(2, 0, 1)


class PixelLMPromptEncoder(nn.Module):
    """The used part of SAM's prompt encoder: grid PE + ``no_mask_embed`` (dense prompt).

    The sparse prompt is the fused codebook embedding itself (one token per level).
    """

    def __init__(self, embed_dim: int, grid: int):
        super().__init__()
        self.embed_dim, self.grid = int(embed_dim), int(grid)
        self.pe_layer = PositionEmbeddingGrid(embed_dim // 2)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """[1, D, G, G]."""
        return self.pe_layer((self.grid, self.grid)).unsqueeze(0)

    def dense_embeddings(self, k: int) -> torch.Tensor:
        """[K, D, G, G] (``no_mask_embed`` broadcast)."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(k, -1, self.grid, self.grid)


def neck(in_dim: int, out_dim: int) -> nn.Sequential:
    """``image_feature_neck``: Conv1x1(no bias)-LayerNorm2d-Conv3x3(no bias)-LayerNorm2d."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False),
        SamLayerNorm(out_dim, eps=1e-6, data_format="channels_first"),
        nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
        SamLayerNorm(out_dim, eps=1e-6, data_format="channels_first"),
    )


def _upscale(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_dim, out_dim, kernel_size=2, stride=2),
        SamLayerNorm(out_dim, eps=1e-6, data_format="channels_first"),
        nn.GELU(),
    )


class MultiScaleMaskDecoder(nn.Module):
    """PixelLM ``MaskDecoderMultiScale`` (one module for all levels).

    Args:
        dim: D. depth / num_heads / mlp_dim: TwoWay transformer (2 / 8 / 2048 for the release).
        num_levels: L. iou_head_hidden_dim: 256 for the release. num_multimask_outputs: 3.
    """

    def __init__(self, dim: int, depth: int = 2, num_heads: int = 8, mlp_dim: int = 2048, num_levels: int = 2,
                 iou_head_hidden_dim: int = 256, num_multimask_outputs: int = 3, attention_downsample_rate: int = 2):
        super().__init__()
        config = SamMaskDecoderConfig(
            hidden_size=dim, mlp_dim=mlp_dim, num_hidden_layers=depth, num_attention_heads=num_heads,
            attention_downsample_rate=attention_downsample_rate, hidden_act="relu",
            layer_norm_eps=1e-5,  # SAM's TwoWayTransformer uses nn.LayerNorm defaults
        )
        config._attn_implementation = "sdpa"  # native-dtype softmax, as SAM
        self.dim, self.num_levels = int(dim), int(num_levels)
        self.transformer = nn.ModuleList([SamTwoWayTransformer(config) for _ in range(num_levels)])
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = _upscale(dim, dim // 8)
        self.upsample_2x = _upscale(dim, dim)
        self.pe1 = PositionEmbeddingGrid(dim // 2)
        self.output_hypernetworks_mlps = nn.ModuleList(
            [SamFeedForward(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = SamFeedForward(dim, iou_head_hidden_dim, self.num_mask_tokens, 3)
        self.level_embed = nn.Embedding(num_levels, dim)

    def forward_level(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor, level: int, previous_masks: torch.Tensor | None = None):
        """One level.

        Args:
            image_embedding: [1, D, G, G] neck output of this level's tap.
            image_pe: [1, D, G, G] grid PE (level 0; level >= 1 uses ``pe1`` at the upsampled size).
            sparse: [K, 1, D] fused codebook token of this level.
            dense: [K, D, G, G] dense prompt.
            previous_masks: [K, 1, h, w] the previous level's masks (level >= 1).

        Returns:
            masks [K, 1, h', w'] (mask token 0), iou_pred [K, 1].
        """
        k = sparse.shape[0]
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0).unsqueeze(0).expand(k, -1, -1)
        tokens = torch.cat([tokens, sparse], dim=1)
        tokens = tokens + self.level_embed.weight[level].view(1, 1, -1)
        src = torch.repeat_interleave(image_embedding, k, dim=0)
        if level > 0:
            if previous_masks is None:
                raise ValueError(f"level {level} needs the previous level's masks")
            src = self.upsample_2x(src)
            h, w = src.shape[-2:]
            prev = previous_masks.mean(dim=1, keepdim=True)
            src = (prev.sigmoid() + 1) * src
            image_pe = self.pe1((h, w)).unsqueeze(0)
            dense = F.interpolate(dense.float(), size=(h, w), mode="bilinear", align_corners=False).to(dense)
        src = src + dense
        pos = torch.repeat_interleave(image_pe, k, dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer[level](tokens[:, None], src, pos, attention_similarity=None)
        hs, src = hs[:, 0], src[:, 0]
        iou_out = hs[:, 0]
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        up = self.output_upscaling(src)
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = up.shape
        masks = (hyper @ up.view(b, c, h * w)).view(b, self.num_mask_tokens, h, w)
        iou = self.iou_prediction_head(iou_out)
        return masks[:, :1], iou[:, :1]
