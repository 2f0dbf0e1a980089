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

Subclasses (the research extensions in ``psalm.modeling.extensions``, beyond the paper) change what the
scoring heads read through two methods, without touching the official computation: ``head_input`` (the
heads' input at each stage: ``decoder_norm(queries)`` here) and ``sentence_head`` (the MLP that scores
sentences: ``refer_head`` here); ``_decode`` carries the conditions as a dict, so a subclass's ``forward``
can add inputs for ``head_input``.
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
    ):
        """``dec_layers`` counts prediction stages as Mask2Former's DEC_LAYERS: ``dec_layers - 1`` layers."""
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

    @classmethod
    def from_config(cls, cfg, in_channels: int, input_shape: dict | None = None):
        """``input_shape``: the backbone's ``output_shape()`` (unused here; for decoders that read backbone maps)."""
        m = cfg.MODEL.MASK_FORMER
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
        }

    def forward(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        queries: torch.Tensor,
        refer_embeddings: torch.Tensor | None = None,
        class_embeddings: torch.Tensor | None = None,
        region_embeddings: list[torch.Tensor] | None = None,
    ) -> dict:
        """
        Args:
            multi_scale_features: ``num_feature_levels`` maps [B, C, h_l, w_l], coarse to fine (s32, s16, s8).
            mask_features: [B, mask_dim, H, W] (stride 4).
            queries: [B, Q, D] query features (projected mask tokens).
            refer_embeddings: [B, 1, D] sentence conditions, or None.
            class_embeddings: [B, K+1, D] category conditions (last = background), or None.
            region_embeddings: list of B tensors [R_b, D] (visual-prompt conditions), or None.
        Returns:
            dict with ``pred_masks`` [B, Q, H, W], ``pred_class_logits`` [B, Q, K+1] | None,
            ``pred_refer_logits`` [B, Q, 1] | None, ``pred_region_logits`` list of [R_b, Q] | None,
            and ``aux_outputs``: ``DEC_LAYERS - 1`` dicts with the same four keys, the first one from the
            raw queries (before layer 0), the last from the second-to-last layer.
        """
        conditions = {"refer": refer_embeddings, "classes": class_embeddings, "regions": region_embeddings}
        return self._decode(multi_scale_features, mask_features, queries, conditions)

    def _decode(self, multi_scale_features, mask_features, queries, conditions: dict) -> dict:
        """The decoder layers and the prediction at every stage; ``conditions``: ``refer`` / ``classes`` /
        ``regions`` (the ``forward`` arguments) and whatever a subclass's ``head_input`` reads."""
        self._check_inputs(
            multi_scale_features, mask_features, queries,
            conditions["refer"], conditions["classes"], conditions["regions"],
        )
        B = queries.shape[0]
        src, pos, sizes = [], [], []
        for i, x in enumerate(multi_scale_features):
            sizes.append(x.shape[-2:])
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))  # [B, HW, D]
            src.append((self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]).transpose(1, 2))
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)
        output = queries

        predictions = []
        pred, attn_mask = self._predict(output, mask_features, sizes[0], conditions)
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
                output, mask_features, sizes[(i + 1) % self.num_feature_levels], conditions
            )
            predictions.append(pred)
        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        return out

    def head_input(self, decoded: torch.Tensor, pred_masks: torch.Tensor, conditions: dict) -> torch.Tensor:
        """[B, Q, D]: what the class / refer / region heads read at one stage: ``decoded`` =
        ``decoder_norm(queries)`` (official; ``pred_masks`` [B, Q, H, W] are this stage's mask logits)."""
        return decoded

    def sentence_head(self) -> nn.Module:
        """The MLP that scores sentence conditions: ``refer_head`` (official ``SEG_proj``)."""
        return self.refer_head

    def _predict(self, output, mask_features, target_size, conditions):
        """Heads on ``decoder_norm(output)`` and the next layer's attention mask [B * heads, Q, h*w]."""
        refer, classes, regions = conditions["refer"], conditions["classes"], conditions["regions"]
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
            decoded = self.head_input(decoded, pred_masks, conditions)
        if classes is not None:
            pred["pred_class_logits"] = torch.einsum("bqd,bkd->bqk", self.class_head(decoded), classes)
        if refer is not None:
            pred["pred_refer_logits"] = torch.einsum("bqd,bkd->bqk", self.sentence_head()(decoded), refer)
        if regions is not None:
            proj = self.region_head(decoded)
            pred["pred_region_logits"] = [torch.einsum("rd,qd->rq", r, p) for r, p in zip(regions, proj)]
        return pred, attn_mask

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


def build_transformer_decoder(cfg, in_channels: int, input_shape: dict | None = None) -> nn.Module:
    """Build ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME`` for features with ``in_channels`` channels
    (``input_shape``: the backbone's ``output_shape()``, for decoders that read backbone maps)."""
    return TRANSFORMER_DECODER_REGISTRY.get(cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME)(
        cfg, in_channels, input_shape=input_shape
    )
