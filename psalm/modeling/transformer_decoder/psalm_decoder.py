"""PSALM's masked-attention transformer decoder (Mask2Former decoder, conditions-scored heads).

Differences from Mask2Former's ``MultiScaleMaskedTransformerDecoder`` (official
``MultiScaleMaskedTransformerDecoderForOPTPreTrain`` with PSALM's flags, ``forward_woconcat``):

* the query **features** are given from outside (the LLM's mask tokens after ``mask_token_projector``,
  [B, Q, D]); only the query **positions** (``query_embed``) are learned here;
* there is no closed-vocabulary classifier. Queries are scored by un-normalised dot products with
  condition embeddings, through three 2-layer MLP heads applied to ``decoder_norm(queries)``:
  ``class_head`` (official ``CLASS_proj``) against K+1 category embeddings (last = background),
  ``refer_head`` (``SEG_proj``) against one sentence embedding, ``region_head`` (``REGION_proj``)
  against each sample's region embeddings. A condition given as None gives a None head.

Layer ``i`` (``DEC_LAYERS - 1`` of them): masked cross-attention on level ``i % 3`` of
[s32, s16, s8] -> self-attention -> FFN (post-norm by default). The memory is
``input_proj(feature) + level_embed`` (keys and values); the sine encoding is added to the keys
only; ``query_embed`` is added to the cross-attention queries and to the self-attention q/k. The
attention mask of a layer comes from the previous prediction, bilinearly resized (in float32) to that
layer's level: positions with ``sigmoid(mask logit) < 0.5`` are masked, and a query whose row would be
fully masked attends everywhere.

Head mask pooling (``MODEL.MASK_FORMER.HEAD_MASK_POOLING``, off in the official model): at every
prediction stage, a feature map ``F`` [B, C_p, h, w] given as ``pool_features`` (the mask features or a
backbone map) is averaged under each query's own predicted mask,
``p_q = sum_x s_q(x) F(x) / (sum_x s_q(x) + 1)`` with ``s_q = sigmoid(mask logit)`` bilinearly resized to
``h x w`` (detached: the scoring losses do not move the masks), and the three scoring heads read
``decoder_norm(q) + head_pool_proj(LN(p_q))`` instead of ``decoder_norm(q)``; the mask head is unchanged.
The extra parameters are ``head_pool_norm`` and ``head_pool_proj`` (C_p -> hidden_dim).

Head mask shape (``MODEL.MASK_FORMER.HEAD_MASK_SHAPE_GRID`` = k, 0 = off = official): at every prediction
stage, each query's own soft mask ``sigmoid(mask logit)`` (detached, at the mask-feature resolution) is
resampled bilinearly at the k x k cell centres of its box (the extent of ``sigmoid >= 0.5``; the whole map
for an empty mask), like an RoIAlign of the mask on itself, and the scoring heads also add
``head_shape_proj(grid)`` (k*k -> hidden_dim). The grid is scale- and position-normalised, so it tells
the heads the silhouette (a square fills it, a diamond leaves the corners empty), which mean-pooled
features cannot. Both options add to the same head input and may be combined.
"""

from __future__ import annotations

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from torch import nn

from .position_encoding import PositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "PSALMMultiScaleMaskedTransformerDecoder",
    "build_transformer_decoder",
    "mask_shape_grid",
    "MLP",
]

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = "Mask decoders: multi-scale features + mask features + queries -> predictions."


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (Mask2Former ``MLP``; keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _with_pos(x, pos):
    return x if pos is None else x + pos


def _xavier_init(module: nn.Module) -> None:
    """Mask2Former's initialisation of the decoder layers: Xavier-uniform for every matrix."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Self-attention over the queries (batch-first [B, Q, D]); keys ``self_attn.*``, ``norm.*``."""

    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        out = tgt + self.dropout(self.self_attn(q, k, value=x, need_weights=False)[0])
        return out if self.normalize_before else self.norm(out)


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from the queries to one memory level; keys ``multihead_attn.*``, ``norm.*``."""

    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt, memory, memory_mask=None, pos=None, query_pos=None):
        """tgt [B, Q, D]; memory, pos [B, HW, D]; memory_mask [B * heads, Q, HW] bool (True = masked)."""
        x = self.norm(tgt) if self.normalize_before else tgt
        attn = self.multihead_attn(
            query=_with_pos(x, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            need_weights=False,
        )[0]
        out = tgt + self.dropout(attn)
        return out if self.normalize_before else self.norm(out)


class FFNLayer(nn.Module):
    """ReLU feed-forward block with residual; keys ``linear1``, ``linear2``, ``norm``."""

    def __init__(self, d_model, dim_feedforward=2048, dropout=0.0, normalize_before=False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        out = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return out if self.normalize_before else self.norm(out)


@TRANSFORMER_DECODER_REGISTRY.register()
class PSALMMultiScaleMaskedTransformerDecoder(nn.Module):
    """Masked-attention decoder with condition-scored heads (see the module docstring)."""

    @configurable
    def __init__(
        self,
        in_channels: int,
        *,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
        head_pool_source: str = "",
        head_pool_dim: int = 0,
        head_shape_grid: int = 0,
    ):
        """``dec_layers`` counts prediction stages as Mask2Former's DEC_LAYERS: ``dec_layers - 1`` layers.
        Head mask pooling: ``head_pool_source`` names the map the caller passes as ``pool_features``
        (``""`` = off, ``"mask_features"`` or a backbone feature), ``head_pool_dim`` its channels ``C_p``.
        ``head_shape_grid``: k of the head mask shape grid (0 = off)."""
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS={dec_layers} must be >= 1")
        self.num_heads = nheads
        self.num_layers = dec_layers - 1
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(self.num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(self.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(self.num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())  # identity, no parameters
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_head = MLP(hidden_dim, hidden_dim, hidden_dim, 2)
        self.refer_head = MLP(hidden_dim, hidden_dim, hidden_dim, 2)
        self.region_head = MLP(hidden_dim, hidden_dim, hidden_dim, 2)
        if bool(head_pool_source) != bool(head_pool_dim):
            raise ValueError(
                f"head mask pooling needs both a source and its channels; got head_pool_source={head_pool_source!r}, "
                f"head_pool_dim={head_pool_dim}"
            )
        self.head_pool_source = head_pool_source
        self.head_pool_dim = head_pool_dim
        if head_pool_dim:
            self.head_pool_norm = nn.LayerNorm(head_pool_dim)
            self.head_pool_proj = nn.Linear(head_pool_dim, hidden_dim)
        if head_shape_grid < 0:
            raise ValueError(
                f"MODEL.MASK_FORMER.HEAD_MASK_SHAPE_GRID={head_shape_grid} must be >= 0 (0 = off, k = a k x k grid)"
            )
        self.head_shape_grid = head_shape_grid
        if head_shape_grid:
            self.head_shape_proj = nn.Linear(head_shape_grid * head_shape_grid, hidden_dim)

    @classmethod
    def from_config(cls, cfg, in_channels: int, input_shape: dict | None = None):
        """``input_shape``: the backbone's ``output_shape()``, needed when HEAD_MASK_POOLING names a backbone map."""
        m = cfg.MODEL.MASK_FORMER
        source = m.HEAD_MASK_POOLING
        if not source:
            head_pool_dim = 0
        elif source == "mask_features":
            head_pool_dim = cfg.MODEL.SEM_SEG_HEAD.MASK_DIM
        elif input_shape is not None and source in input_shape:
            head_pool_dim = input_shape[source].channels
        else:
            known = sorted(input_shape) if input_shape is not None else "the backbone's features"
            raise ValueError(
                f"MODEL.MASK_FORMER.HEAD_MASK_POOLING={source!r}: expected '' (off), 'mask_features' or one of "
                f"{known}"
            )
        return {
            "in_channels": in_channels,
            "hidden_dim": m.HIDDEN_DIM,
            "num_queries": m.NUM_OBJECT_QUERIES,
            "nheads": m.NHEADS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dec_layers": m.DEC_LAYERS,
            "pre_norm": m.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": m.ENFORCE_INPUT_PROJ,
            "dropout": m.DROPOUT,
            "head_pool_source": source,
            "head_pool_dim": head_pool_dim,
            "head_shape_grid": m.HEAD_MASK_SHAPE_GRID,
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
        """
        Args:
            multi_scale_features: ``num_feature_levels`` maps [B, C, h_l, w_l], coarse to fine (s32, s16, s8).
            mask_features: [B, mask_dim, H, W] (stride 4).
            queries: [B, Q, D] query features (projected mask tokens).
            refer_embeddings: [B, 1, D] sentence conditions, or None.
            class_embeddings: [B, K+1, D] category conditions (last = background), or None.
            region_embeddings: list of B tensors [R_b, D] (visual-prompt conditions), or None.
            pool_features: [B, C_p, h, w] for head mask pooling (required when it is on, else ignored).
        Returns:
            dict with ``pred_masks`` [B, Q, H, W], ``pred_class_logits`` [B, Q, K+1] | None,
            ``pred_refer_logits`` [B, Q, 1] | None, ``pred_region_logits`` list of [R_b, Q] | None,
            and ``aux_outputs``: ``DEC_LAYERS - 1`` dicts with the same four keys, the first one from the
            raw queries (before layer 0), the last from the second-to-last layer.
        """
        self._check_inputs(
            multi_scale_features, mask_features, queries, refer_embeddings, class_embeddings, region_embeddings
        )
        if self.head_pool_dim and (
            pool_features is None or pool_features.shape[:2] != (queries.shape[0], self.head_pool_dim)
        ):
            raise ValueError(
                f"head mask pooling (MODEL.MASK_FORMER.HEAD_MASK_POOLING) needs pool_features "
                f"[B={queries.shape[0]}, {self.head_pool_dim}, h, w]; got "
                f"{None if pool_features is None else tuple(pool_features.shape)}"
            )
        B = queries.shape[0]
        src, pos, sizes = [], [], []
        for i, x in enumerate(multi_scale_features):
            sizes.append(x.shape[-2:])
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))  # [B, HW, D]
            src.append((self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]).transpose(1, 2))
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)
        output = queries
        conditions = (refer_embeddings, class_embeddings, region_embeddings, pool_features)

        predictions = []
        pred, attn_mask = self._predict(output, mask_features, sizes[0], *conditions)
        predictions.append(pred)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            # a query whose mask covers nothing attends everywhere
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](
                output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            pred, attn_mask = self._predict(
                output, mask_features, sizes[(i + 1) % self.num_feature_levels], *conditions
            )
            predictions.append(pred)
        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        return out

    def _predict(self, output, mask_features, target_size, refer, classes, regions, pool_features):
        """Heads on ``decoder_norm(output)`` and the next layer's attention mask [B * heads, Q, h*w]."""
        decoded = self.decoder_norm(output)  # [B, Q, D]
        pred_masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        # fp32 island (official): resize the mask logits in float32
        resized = F.interpolate(pred_masks.float(), size=target_size, mode="bilinear", align_corners=False)
        attn_mask = resized.sigmoid().flatten(2) < 0.5  # [B, Q, hw]
        attn_mask = attn_mask.repeat_interleave(self.num_heads, dim=0).detach()  # batch-major, as MHA expects
        pred = {
            "pred_masks": pred_masks,
            "pred_class_logits": None,
            "pred_refer_logits": None,
            "pred_region_logits": None,
        }
        if classes is not None or refer is not None or regions is not None:
            if self.head_pool_dim:
                decoded = decoded + self._mask_pooled(pred_masks, pool_features)
            if self.head_shape_grid:
                decoded = decoded + self.head_shape_proj(mask_shape_grid(pred_masks, self.head_shape_grid))
        if classes is not None:
            pred["pred_class_logits"] = torch.einsum("bqd,bkd->bqk", self.class_head(decoded), classes)
        if refer is not None:
            pred["pred_refer_logits"] = torch.einsum("bqd,bkd->bqk", self.refer_head(decoded), refer)
        if regions is not None:
            proj = self.region_head(decoded)
            pred["pred_region_logits"] = [torch.einsum("rd,qd->rq", r, p) for r, p in zip(regions, proj)]
        return pred, attn_mask

    def _mask_pooled(self, pred_masks, pool_features):
        """[B, Q, D]: ``head_pool_proj(LN(p_q))`` for ``pool_features`` [B, C_p, h, w] averaged under each
        query's (detached) soft mask ``sigmoid(pred_masks)`` [B, Q, H, W] resized to h x w (module docstring)."""
        logits = pred_masks.detach().float()
        if logits.shape[-2:] != pool_features.shape[-2:]:
            logits = F.interpolate(logits, size=pool_features.shape[-2:], mode="bilinear", align_corners=False)
        weights = logits.sigmoid().to(pool_features.dtype)
        pooled = torch.einsum("bqhw,bchw->bqc", weights, pool_features)
        pooled = pooled / (weights.sum(dim=(-2, -1)).unsqueeze(-1) + 1.0)
        return self.head_pool_proj(self.head_pool_norm(pooled))

    def _check_inputs(self, feats, mask_features, queries, refer, classes, regions):
        if len(feats) != self.num_feature_levels:
            raise ValueError(
                f"expected {self.num_feature_levels} multi-scale features (s32, s16, s8); got {len(feats)}"
            )
        if queries.dim() != 3 or queries.shape[1] != self.num_queries:
            raise ValueError(
                f"queries must be [B, {self.num_queries}, D] (MODEL.MASK_FORMER.NUM_OBJECT_QUERIES); "
                f"got {tuple(queries.shape)}"
            )
        B = queries.shape[0]
        if mask_features.shape[0] != B or any(f.shape[0] != B for f in feats):
            raise ValueError("features and queries have different batch sizes")
        for name, t in (("refer_embeddings", refer), ("class_embeddings", classes)):
            if t is not None and (t.dim() != 3 or t.shape[0] != B):
                raise ValueError(f"{name} must be [B={B}, N, D]; got {tuple(t.shape)}")
        if regions is not None and (len(regions) != B or any(r.dim() != 2 for r in regions)):
            raise ValueError(f"region_embeddings must be a list of B={B} tensors [R_b, D]")


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


def build_transformer_decoder(cfg, in_channels: int, input_shape: dict | None = None) -> nn.Module:
    """Build ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME`` for features with ``in_channels`` channels
    (``input_shape``: the backbone's ``output_shape()``, for HEAD_MASK_POOLING on a backbone map)."""
    return TRANSFORMER_DECODER_REGISTRY.get(cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME)(
        cfg, in_channels, input_shape=input_shape
    )
