"""PSALM's Swin Transformer backbone (detectron2 ``Backbone``) built on transformers' ``SwinBackbone``.

PSALM uses the detectron2-style Swin of Mask2Former (``D2SwinTransformer``): windows are padded to a
multiple of the window size *before* the cyclic shift, the shifted-window mask (-100) is built on the
padded map, PatchMerging pads odd sizes, and every output stage has its own LayerNorm. transformers'
``SwinBackbone`` computes exactly that function (reference spec section 9: 2e-15 max abs difference
in fp64 with sdpa attention); ``SwinModel`` does not (it clamps window/shift on small stages and
mutates itself), and timm's Swin shifts before padding. So this module wraps ``SwinBackbone`` and only
adds the detectron2 interface: ``res2..res5`` outputs at strides 4/8/16/32, ``output_shape()``,
registration in ``BACKBONE_REGISTRY`` and construction from ``cfg.MODEL.SWIN.*``.

State-dict names are transformers' ``SwinBackbone`` names under ``model.`` (e.g.
``model.swin.encoder.layers.0.blocks.1.attention.q_proj.weight``,
``model.hidden_states_norms.stage1.weight``). ``psalm.checkpoint.vision_keys`` converts the official
PSALM / Mask2Former names (fused ``qkv``, ``norm{i}``) to these.
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import nn
from transformers import SwinConfig
from transformers.models.swin.modeling_swin import SwinBackbone

__all__ = ["PSALMSwinTransformer", "SWIN_STAGE_TO_FEATURE"]

# detectron2 feature names of the four Swin stages (transformers' ``stage1..stage4``).
SWIN_STAGE_TO_FEATURE = {"stage1": "res2", "stage2": "res3", "stage3": "res4", "stage4": "res5"}
_FEATURE_TO_STAGE = {v: k for k, v in SWIN_STAGE_TO_FEATURE.items()}
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@BACKBONE_REGISTRY.register()
class PSALMSwinTransformer(Backbone):
    """Swin Transformer with detectron2 outputs ``{"res2": [B, C, H/4, W/4], ..., "res5": [B, 8C, H/32, W/32]}``.

    Any input size works (patches, windows and merges are padded internally, as in the official
    code); the output of stage ``i`` has size ``ceil(H / 2^(i+1))`` after the patch embedding's
    ``ceil(H / 4)``. ``C = embed_dim``; stage ``i`` has ``embed_dim * 2**i`` channels.

    Unsupported options of the official constructor raise instead of being ignored:
    ``qk_scale`` (must be None: the scale is ``head_dim ** -0.5``), ``ape`` (absolute position
    embeddings; off in PSALM / Mask2Former Swin-B) and ``patch_norm=False``.

    Dropout note: ``drop_rate`` becomes transformers' ``hidden_dropout_prob`` (after the patch
    embedding, the attention projection and the MLP). The official Swin additionally drops after the
    MLP's hidden activation. PSALM uses ``drop_rate=0``, where both are the identity.
    """

    @configurable
    def __init__(
        self,
        *,
        in_chans: int = 3,
        patch_size: int = 4,
        embed_dim: int = 128,
        depths: tuple[int, ...] = (2, 2, 18, 2),
        num_heads: tuple[int, ...] = (4, 8, 16, 32),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        ape: bool = False,
        patch_norm: bool = True,
        pretrain_img_size: int = 224,
        out_features: tuple[str, ...] = ("res2", "res3", "res4", "res5"),
        use_checkpoint: bool = False,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(
                f"MODEL.SWIN.DEPTHS and NUM_HEADS must have 4 entries (res2..res5); got {depths} / {num_heads}"
            )
        for i, h in enumerate(num_heads):
            if (embed_dim * 2**i) % h:
                raise ValueError(
                    f"stage {i}: {embed_dim * 2**i} channels are not divisible by {h} heads "
                    "(MODEL.SWIN.EMBED_DIM / NUM_HEADS)"
                )
        if qk_scale is not None:
            raise ValueError(
                f"MODEL.SWIN.QK_SCALE={qk_scale} is not supported: the attention scale is head_dim**-0.5 "
                "(official PSALM and Mask2Former use None)"
            )
        if ape:
            raise ValueError("MODEL.SWIN.APE=True (absolute position embedding) is not supported; PSALM uses False")
        if not patch_norm:
            raise ValueError("MODEL.SWIN.PATCH_NORM=False is not supported; PSALM uses True")
        if attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"MODEL.SWIN.ATTN_IMPLEMENTATION={attn_implementation!r}; expected one of {_ATTN_IMPLEMENTATIONS}"
            )
        unknown = [f for f in out_features if f not in _FEATURE_TO_STAGE]
        if unknown or not out_features:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES={list(out_features)}: each must be one of res2..res5")

        config = SwinConfig(
            image_size=pretrain_img_size,  # only sizes the (disabled) absolute embedding
            patch_size=patch_size,
            num_channels=in_chans,
            embed_dim=embed_dim,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            hidden_dropout_prob=drop_rate,
            attention_probs_dropout_prob=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            hidden_act="gelu",  # exact erf GELU, as the official nn.GELU
            use_absolute_embeddings=False,
            layer_norm_eps=1e-5,
            out_features=[s for s in SWIN_STAGE_TO_FEATURE if SWIN_STAGE_TO_FEATURE[s] in out_features],
            attn_implementation=attn_implementation,
        )
        self.model = SwinBackbone(config)
        # SwinModel's final LayerNorm is not used by SwinBackbone (it reads the per-stage norms); remove
        # it so that the state dict holds no dead parameters.
        self.model.swin.layernorm = nn.Identity()
        if use_checkpoint:
            self.model.activation_checkpointing_enable()

        # transformers returns the stages in network order; keep ours in the same order.
        self._out_features = [f for f in ("res2", "res3", "res4", "res5") if f in out_features]
        self._out_feature_strides = {f: patch_size * 2 ** (int(f[3]) - 2) for f in self._out_features}
        self._out_feature_channels = {f: embed_dim * 2 ** (int(f[3]) - 2) for f in self._out_features}

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec | None = None):
        s = cfg.MODEL.SWIN
        return {
            "in_chans": input_shape.channels if input_shape is not None else len(cfg.MODEL.PIXEL_MEAN),
            "patch_size": s.PATCH_SIZE,
            "embed_dim": s.EMBED_DIM,
            "depths": tuple(s.DEPTHS),
            "num_heads": tuple(s.NUM_HEADS),
            "window_size": s.WINDOW_SIZE,
            "mlp_ratio": s.MLP_RATIO,
            "qkv_bias": s.QKV_BIAS,
            "qk_scale": s.QK_SCALE,
            "drop_rate": s.DROP_RATE,
            "attn_drop_rate": s.ATTN_DROP_RATE,
            "drop_path_rate": s.DROP_PATH_RATE,
            "ape": s.APE,
            "patch_norm": s.PATCH_NORM,
            "pretrain_img_size": s.PRETRAIN_IMG_SIZE,
            "out_features": tuple(s.OUT_FEATURES),
            "use_checkpoint": s.USE_CHECKPOINT,
            "attn_implementation": s.ATTN_IMPLEMENTATION,
        }

    @property
    def size_divisibility(self) -> int:
        # Any size works (internal padding); 32 keeps res5 an exact 1/32 of a padded batch.
        return 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: normalised images [B, 3, H, W] -> {"res2".."res5"} (those in ``OUT_FEATURES``), NCHW."""
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images [B, C, H, W]; got shape {tuple(x.shape)}")
        feature_maps = self.model(x).feature_maps
        return dict(zip(self._out_features, feature_maps))
