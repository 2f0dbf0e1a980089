"""Mask2Former's multi-scale deformable-attention pixel decoder, with PSALM's differences.

Design and state-dict names follow detectron2 Mask2Former (``MSDeformAttnPixelDecoder``):
``input_proj.{l}.{0: Conv1x1, 1: GroupNorm(32)}`` (l = 0 for the coarsest encoder level),
``transformer.level_embed``, ``transformer.encoder.layers.{i}.{self_attn, norm1, linear1, linear2, norm2}``,
``adapter_{k}`` / ``layer_{k}`` (detectron2 ``Conv2d`` with ``.norm``), ``mask_features``.

PSALM differences (official checkpoint and golden data):
* the FPN lateral (``adapter_k``) and output (``layer_k``) convs have a **bias** before their GroupNorm
  (``fpn_conv_bias=True``; Mask2Former: no bias);
* the lateral conv is followed by a **ReLU** (``lateral_activation=True``; Mask2Former: none). The
  golden data show it: without it ``mask_features`` is off by 1.6;
* the encoder FFN width is configurable (official PSALM hard-codes 1024);
* float32 "islands", kept even when the module runs in float64: sine positional encodings, the
  encoder's reference points and valid ratios, and the FPN top-down bilinear upsample.
"""

from __future__ import annotations

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.utils.registry import Registry
from torch import nn

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .ms_deform_attn import MSDeformAttn

__all__ = ["PIXEL_DECODER_REGISTRY", "MSDeformAttnPixelDecoder", "build_pixel_decoder"]

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = "Pixel decoders: backbone features -> mask features + multi-scale features."


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.0, n_levels=4, n_heads=8, n_points=4, impl="auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None,
                spatial_shapes_list=None):
        """src, pos: [B, S, C]; reference_points: [B, S, L, 2] -> [B, S, C]."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask,
                              spatial_shapes_list)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoder(nn.Module):
    """A stack of encoder layers over the flattened multi-level map (keys ``layers.{i}.*``)."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([MSDeformAttnTransformerEncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel-centre reference points [B, S, L, 2] (x, y), normalised by the valid size; float32."""
        points = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ys, xs = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
                indexing="ij",
            )
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            points.append(torch.stack((xs, ys), -1))
        points = torch.cat(points, 1)
        return points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, reference_points, pos, padding_mask=None,
                spatial_shapes_list=None):
        """src, pos: [B, S, C]; reference_points: [B, S, L, 2] (see :meth:`reference_points`) -> [B, S, C].

        ``spatial_shapes_list``: ``spatial_shapes`` as Python (H_l, W_l) pairs (read once by the
        caller instead of a host sync in every layer), or None."""
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask,
                        spatial_shapes_list)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds ``level_embed`` to the positional term and runs the encoder."""

    def __init__(
        self,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        dim_feedforward=1024,
        dropout=0.0,
        num_feature_levels=3,
        enc_n_points=4,
        impl="auto",
    ):
        super().__init__()
        self.encoder = MSDeformAttnTransformerEncoder(
            num_encoder_layers,
            d_model=d_model,
            d_ffn=dim_feedforward,
            dropout=dropout,
            n_levels=num_feature_levels,
            n_heads=nhead,
            n_points=enc_n_points,
            impl=impl,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        """srcs / pos_embeds: per level [B, C, H_l, W_l] -> ([B, S, C], spatial_shapes [L, 2], level_start_index [L])."""
        src_flat, pos_flat, shapes = [], [], []
        for lvl, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        device = srcs[0].device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        # Mask2Former never pads here: every position is valid (ratios are 1, computed in float32)
        valid_ratios = torch.ones(srcs[0].shape[0], len(srcs), 2, dtype=torch.float32, device=device)
        shapes = [(int(h), int(w)) for h, w in shapes]  # from the tensors' sizes: no host sync
        ref = self.encoder.reference_points(shapes, valid_ratios)
        memory = self.encoder(torch.cat(src_flat, 1), spatial_shapes, level_start_index, ref, torch.cat(pos_flat, 1),
                              spatial_shapes_list=shapes)
        return memory, spatial_shapes, level_start_index


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone features -> (mask_features, transformer_encoder_features, multi_scale_features).

    * ``mask_features``: [B, mask_dim, H/s0, W/s0] at the finest input stride s0 (res2: 4);
    * ``transformer_encoder_features``: [B, conv_dim, H/32, W/32], the coarsest encoder output;
    * ``multi_scale_features``: the first ``num_feature_levels`` (3) outputs, coarse to fine:
      [s32, s16, s8] maps with ``conv_dim`` channels, for the masked-attention decoder.
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: str = "GN",
        transformer_in_features: list[str],
        common_stride: int,
        enc_n_points: int = 4,
        deform_attn_impl: str = "auto",
        fpn_conv_bias: bool = True,
        lateral_activation: bool = True,
        num_feature_levels: int = 3,
    ):
        super().__init__()
        if conv_dim % 32:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.CONVS_DIM={conv_dim} must be a multiple of 32 (GroupNorm(32, C))")
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(f"deformable encoder features {missing} are not among the inputs {list(input_shape)}")
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in by_stride]  # fine -> coarse
        enc = sorted(((k, input_shape[k]) for k in transformer_in_features), key=lambda kv: kv[1].stride)
        self.transformer_in_features = [k for k, _ in enc]  # fine -> coarse
        self.transformer_num_feature_levels = len(enc)
        # input_proj[0] is the coarsest level (the encoder runs coarse -> fine)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s.channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for _, s in enc[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=enc_n_points,
            impl=deform_attn_impl,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.num_feature_levels = num_feature_levels

        # FPN levels finer than the encoder's finest input (res2 when the encoder takes res3..res5)
        min_encoder_stride = enc[0][1].stride
        fpn = [(k, s) for k, s in by_stride if s.stride < min_encoder_stride]
        if not fpn or fpn[0][1].stride != common_stride:
            raise ValueError(
                f"COMMON_STRIDE={common_stride} must be the stride of the finest input feature below the encoder's "
                f"({[(k, s.stride) for k, s in by_stride]})"
            )
        self.num_fpn_levels = len(fpn)
        self.lateral_convs, self.output_convs = [], []
        for idx, (_, s) in enumerate(fpn):
            lateral = Conv2d(
                s.channels,
                conv_dim,
                kernel_size=1,
                bias=fpn_conv_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu if lateral_activation else None,
            )
            output = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=fpn_conv_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        # top-down order: coarsest FPN level first
        self.lateral_convs, self.output_convs = self.lateral_convs[::-1], self.output_convs[::-1]
        self._fpn_features = [k for k, _ in fpn][::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        h = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in h.IN_FEATURES},
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": h.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            "transformer_dim_feedforward": h.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD,
            "transformer_enc_layers": h.TRANSFORMER_ENC_LAYERS,
            "conv_dim": h.CONVS_DIM,
            "mask_dim": h.MASK_DIM,
            "norm": h.NORM,
            "transformer_in_features": list(h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "common_stride": h.COMMON_STRIDE,
            "enc_n_points": h.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "deform_attn_impl": h.DEFORM_ATTN_IMPL,
        }

    def forward(self, features: dict[str, torch.Tensor]):
        """``features``: {"res2": [B, C2, H/4, W/4], ...} -> (mask_features, encoder_features, multi_scale_features)."""
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise KeyError(f"pixel decoder inputs {missing} missing from the backbone features {list(features)}")
        srcs, pos = [], []
        for idx, f in enumerate(self.transformer_in_features[::-1]):  # coarse -> fine
            x = features[f]
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        memory, _, _ = self.transformer(srcs, pos)
        B = memory.shape[0]
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        outs = [
            z.transpose(1, 2).reshape(B, -1, h, w)
            for z, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        for f, lateral, output in zip(self._fpn_features, self.lateral_convs, self.output_convs):
            cur = lateral(features[f])
            # fp32 island (official): upsample in float32, then back to the working dtype
            up = F.interpolate(outs[-1].float(), size=cur.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(output(cur + up.to(cur.dtype)))
        return self.mask_features(outs[-1]), outs[0], outs[: self.num_feature_levels]

    forward_features = forward  # Mask2Former's name for the same call


def build_pixel_decoder(cfg, input_shape: dict[str, ShapeSpec]) -> nn.Module:
    """Build ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` from the backbone's ``output_shape()``."""
    return PIXEL_DECODER_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME)(cfg, input_shape)
