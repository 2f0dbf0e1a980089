"""Key renames for the vision and mask-generation modules (pure functions, no I/O).

Two source layouts are handled:

* the **official PSALM** checkpoint (``llava_phi.PSALM``; key list in
  ``shared/reference/psalm_official_state_dict.tsv``): ``model.vision_tower.*``, ``model.mm_projector.*``,
  ``pixel_decoder.*``, ``predictor.*``;
* a **Mask2Former detectron2** ``.pkl`` (``model_final_*.pkl``): ``backbone.*``,
  ``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``.

Each function converts one group and returns a :class:`KeyConversion`: the converted tensors under our
names (``dst_prefix`` + our module's state-dict key), the source keys dropped on purpose (with the
reason) and the target keys the source does not provide by design (to pass to
``psalm.checkpoint.load_strict(..., allow_missing=...)``). Keys outside ``src_prefix`` are ignored (the
caller composes the groups); keys inside it that no rule knows are passed through unchanged, so that
``load_strict`` reports them by name as unexpected. Nothing is dropped silently.

Tensors are not copied except where a fused tensor is split (``qkv``) or a table truncated.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import torch

__all__ = [
    "KeyConversion",
    "official_backbone_to_psalm",
    "official_projector_to_psalm",
    "official_pixel_decoder_to_psalm",
    "official_predictor_to_psalm",
    "mask2former_backbone_to_psalm",
    "mask2former_pixel_decoder_to_psalm",
    "mask2former_predictor_to_psalm",
    "PREDICTOR_HEADS",
]

# Our predictor's score heads (2-layer MLPs) and the official names they come from.
PREDICTOR_HEADS = {"CLASS_proj": "class_head", "SEG_proj": "refer_head", "REGION_proj": "region_head"}


@dataclasses.dataclass
class KeyConversion:
    """Result of converting one key group."""

    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # source key -> reason
    allowed_missing: list[str] = dataclasses.field(default_factory=list)  # target keys absent by design

    def merge(self, other: "KeyConversion") -> "KeyConversion":
        clash = sorted(set(self.state_dict) & set(other.state_dict))
        if clash:
            raise ValueError(f"key groups overlap after conversion: {clash[:5]}")
        return KeyConversion(
            {**self.state_dict, **other.state_dict},
            {**self.dropped, **other.dropped},
            self.allowed_missing + other.allowed_missing,
        )

    def format(self) -> str:
        lines = [f"{len(self.state_dict)} converted key(s)"]
        if self.dropped:
            lines.append(f"{len(self.dropped)} dropped source key(s):")
            lines += [f"  {k}: {why}" for k, why in sorted(self.dropped.items())]
        if self.allowed_missing:
            lines.append(f"{len(self.allowed_missing)} target key(s) absent from the source by design:")
            lines += [f"  {k}" for k in self.allowed_missing]
        return "\n".join(lines)


def _group(sd: Mapping[str, torch.Tensor], src_prefix: str) -> dict[str, torch.Tensor]:
    """The keys of ``sd`` under ``src_prefix``, prefix stripped; error if there are none."""
    out = {k[len(src_prefix) :]: v for k, v in sd.items() if k.startswith(src_prefix)}
    if not out:
        sample = ", ".join(list(sd)[:5])
        raise ValueError(f"no key starts with {src_prefix!r} (first keys: {sample}); wrong checkpoint or prefix?")
    return out


# ----------------------------------------------------------------------------------------- Swin


def _relative_position_index(window: int) -> torch.Tensor:
    """The Swin relative-position index [window^2, window^2] (row-major (dy, dx) pairs)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _check_relative_position_index(key: str, value: torch.Tensor) -> None:
    n = value.shape[0]
    window = int(round(n**0.5))
    if value.dim() != 2 or value.shape[1] != n or window * window != n:
        raise ValueError(f"{key}: expected a square [W*W, W*W] index, got shape {tuple(value.shape)}")
    if not torch.equal(value.long().cpu(), _relative_position_index(window)):
        raise ValueError(
            f"{key}: values differ from the standard Swin relative-position index for window {window}; "
            "this checkpoint is not a standard Swin and cannot be converted"
        )


_SWIN_BLOCK_RENAMES = (
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.o_proj."),
    ("attn.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
    ("mlp.", "mlp."),
)


def _swin_to_psalm(sd, src_prefix: str, dst_prefix: str) -> KeyConversion:
    out, dropped = {}, {}
    for key, value in _group(sd, src_prefix).items():
        src = src_prefix + key
        new = None
        if key.startswith("patch_embed.proj."):
            new = "model.swin.embeddings.patch_embeddings.projection." + key[len("patch_embed.proj.") :]
        elif key.startswith("patch_embed.norm."):
            new = "model.swin.embeddings.norm." + key[len("patch_embed.norm.") :]
        elif m := re.fullmatch(r"norm(\d+)\.(weight|bias)", key):
            new = f"model.hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"
        elif m := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key):
            new = f"model.swin.encoder.layers.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            base = f"model.swin.encoder.layers.{m[1]}.blocks.{m[2]}."
            sub = m[3]
            if sub in ("attn.qkv.weight", "attn.qkv.bias"):
                if value.shape[0] % 3:
                    raise ValueError(f"{src}: fused qkv of shape {tuple(value.shape)} is not divisible by 3")
                # official: qkv(x).reshape(B, N, 3, heads, head_dim) -> rows [0:C] q, [C:2C] k, [2C:3C] v
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{dst_prefix}{base}attention.{name}.{sub.rsplit('.', 1)[1]}"] = part.clone()
                continue
            if sub == "attn.relative_position_index":
                _check_relative_position_index(src, value)
                dropped[src] = "relative-position index: a non-persistent buffer recomputed from the window size"
                continue
            for old, rep in _SWIN_BLOCK_RENAMES:
                if sub.startswith(old):
                    new = base + rep + sub[len(old) :]
                    break
        out[dst_prefix + (new if new is not None else key)] = value
    return KeyConversion(out, dropped)


def official_backbone_to_psalm(
    sd: Mapping[str, torch.Tensor], src_prefix: str = "model.vision_tower.", dst_prefix: str = "backbone."
) -> KeyConversion:
    """Official PSALM Swin (``model.vision_tower.*``) -> :class:`PSALMSwinTransformer` (transformers names).

    Official key (under ``src_prefix``) -> ours (under ``dst_prefix``); i = stage, j = block:

    * ``patch_embed.proj.*`` -> ``model.swin.embeddings.patch_embeddings.projection.*``
    * ``patch_embed.norm.*`` -> ``model.swin.embeddings.norm.*``
    * ``layers.i.blocks.j.norm1.*`` / ``norm2.*`` -> ``model.swin.encoder.layers.i.blocks.j.layernorm_before.*`` /
      ``layernorm_after.*``
    * ``layers.i.blocks.j.attn.qkv.{weight,bias}`` -> split in 3 equal chunks along dim 0 (rows [0:C] q,
      [C:2C] k, [2C:3C] v) -> ``...blocks.j.attention.{q_proj,k_proj,v_proj}.*``
    * ``layers.i.blocks.j.attn.proj.*`` -> ``...blocks.j.attention.o_proj.*``
    * ``layers.i.blocks.j.attn.relative_position_bias_table`` ->
      ``...blocks.j.attention.relative_position_bias.relative_position_bias_table``
    * ``layers.i.blocks.j.attn.relative_position_index`` -> dropped (checked equal to the standard index;
      transformers recomputes it)
    * ``layers.i.blocks.j.mlp.fc1.*`` / ``fc2.*`` -> ``...blocks.j.mlp.fc1.*`` / ``fc2.*``
    * ``layers.i.downsample.{reduction,norm}.*`` -> ``model.swin.encoder.layers.i.downsample.*``
    * ``norm{i}.*`` (i = 0..3) -> ``model.hidden_states_norms.stage{i+1}.*``
    """
    return _swin_to_psalm(sd, src_prefix, dst_prefix)


def mask2former_backbone_to_psalm(
    sd: Mapping[str, torch.Tensor], src_prefix: str = "backbone.", dst_prefix: str = "backbone."
) -> KeyConversion:
    """Mask2Former ``D2SwinTransformer`` (``backbone.*`` of the .pkl) -> ours.

    The Mask2Former Swin has exactly the official PSALM layout (PSALM's Swin weights come from this
    pkl), so the mapping is that of :func:`official_backbone_to_psalm`.
    """
    return _swin_to_psalm(sd, src_prefix, dst_prefix)


# ------------------------------------------------------------------------------------ projector


def official_projector_to_psalm(
    sd: Mapping[str, torch.Tensor], src_prefix: str = "model.mm_projector.", dst_prefix: str = "projector."
) -> KeyConversion:
    """Official ``ResNetSwin`` projector (``model.mm_projector.*``) -> :class:`SwinConvProjector`.

    ``layer1.0.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}.*`` -> ``{conv1,bn1,conv2,bn2,downsample.0,
    downsample.1}.*`` (BN running statistics and ``num_batches_tracked`` included); ``fc.*`` -> ``fc.*``.
    """
    out = {}
    for key, value in _group(sd, src_prefix).items():
        new = key[len("layer1.0.") :] if key.startswith("layer1.0.") else key
        out[dst_prefix + new] = value
    return KeyConversion(out)


# -------------------------------------------------------------------------------- pixel decoder

_OFFICIAL_FPN_CONV = re.compile(r"((?:adapter|layer)_\d+)\.([01])\.(.+)")


def official_pixel_decoder_to_psalm(
    sd: Mapping[str, torch.Tensor], src_prefix: str = "pixel_decoder.", dst_prefix: str = "pixel_decoder."
) -> KeyConversion:
    """Official PSALM ``MSDeformAttnPixelDecoder`` -> ours (detectron2 / Mask2Former names).

    PSALM stores its FPN convs as ``nn.Sequential(Conv2d(bias=True), GroupNorm)``:
    ``adapter_k.0.{weight,bias}`` -> ``adapter_k.{weight,bias}``, ``adapter_k.1.*`` -> ``adapter_k.norm.*``,
    and the same for ``layer_k``. Everything else (``input_proj.*``, ``transformer.*``,
    ``mask_features.*``) has the same name.
    """
    out = {}
    for key, value in _group(sd, src_prefix).items():
        if m := _OFFICIAL_FPN_CONV.fullmatch(key):
            key = f"{m[1]}.{m[3]}" if m[2] == "0" else f"{m[1]}.norm.{m[3]}"
        out[dst_prefix + key] = value
    return KeyConversion(out)


def mask2former_pixel_decoder_to_psalm(
    sd: Mapping[str, torch.Tensor],
    src_prefix: str = "sem_seg_head.pixel_decoder.",
    dst_prefix: str = "pixel_decoder.",
) -> KeyConversion:
    """Mask2Former pixel decoder -> ours. Names are identical (detectron2 layout).

    Our ``adapter_k`` / ``layer_k`` convs have a bias before their GroupNorm (as PSALM); Mask2Former's
    have none (``bias=False``). Those biases are returned in ``allowed_missing`` by exact name and
    keep their zero initialisation, which is what the official PSALM initialisation did.
    """
    group = _group(sd, src_prefix)
    out = {dst_prefix + k: v for k, v in group.items()}
    allowed_missing = [
        f"{dst_prefix}{m[1]}.bias"
        for k in group
        if (m := re.fullmatch(r"((?:adapter|layer)_\d+)\.weight", k)) and f"{m[1]}.bias" not in group
    ]
    return KeyConversion(out, {}, sorted(allowed_missing))


# ------------------------------------------------------------------------------------ predictor

_DEAD_OFFICIAL_PREDICTOR = {
    "query_feat.weight": "dead in PSALM: the query features are the LLM's projected mask tokens",
    "SEG_query_embed.weight": "dead in PSALM: only used by the disabled seg_concat path",
}


def official_predictor_to_psalm(
    sd: Mapping[str, torch.Tensor], src_prefix: str = "predictor.", dst_prefix: str = "predictor."
) -> KeyConversion:
    """Official ``MultiScaleMaskedTransformerDecoderForOPTPreTrain`` -> :class:`PSALMMultiScaleMaskedTransformerDecoder`.

    ``CLASS_proj.*`` -> ``class_head.*``, ``SEG_proj.*`` -> ``refer_head.*``, ``REGION_proj.*`` ->
    ``region_head.*``; ``query_feat.weight`` and ``SEG_query_embed.weight`` are dropped (dead
    parameters). ``transformer_{self,cross}_attention_layers.*``, ``transformer_ffn_layers.*``,
    ``decoder_norm.*``, ``query_embed.*``, ``level_embed.*``, ``mask_embed.*``, ``input_proj.*`` keep
    their names.
    """
    out, dropped = {}, {}
    for key, value in _group(sd, src_prefix).items():
        if key in _DEAD_OFFICIAL_PREDICTOR:
            dropped[src_prefix + key] = _DEAD_OFFICIAL_PREDICTOR[key]
            continue
        head, _, rest = key.partition(".")
        if head in PREDICTOR_HEADS:
            key = f"{PREDICTOR_HEADS[head]}.{rest}"
        out[dst_prefix + key] = value
    return KeyConversion(out, dropped)


def _head_keys(dst_prefix: str) -> list[str]:
    return [
        f"{dst_prefix}{h}.layers.{i}.{p}" for h in PREDICTOR_HEADS.values() for i in (0, 1) for p in ("weight", "bias")
    ]


def mask2former_predictor_to_psalm(
    sd: Mapping[str, torch.Tensor],
    src_prefix: str = "sem_seg_head.predictor.",
    dst_prefix: str = "predictor.",
    num_queries: int | None = None,
) -> KeyConversion:
    """Mask2Former ``MultiScaleMaskedTransformerDecoder`` -> ours.

    * ``class_embed.*`` (the closed-vocabulary classifier) is dropped: PSALM scores queries against
      condition embeddings;
    * ``query_feat.weight`` (old checkpoints: ``static_query.weight``, renamed first, as Mask2Former
      does) is dropped: PSALM's query features come from the LLM;
    * ``query_embed.weight`` is kept; with ``num_queries`` set and the checkpoint holding more rows
      (e.g. 200-query instance models), the first ``num_queries`` rows are kept, otherwise the table
      is unchanged (a different size is then reported by ``load_strict``);
    * our ``class_head`` / ``refer_head`` / ``region_head`` are not in the pkl: ``allowed_missing``.
    """
    group = dict(_group(sd, src_prefix))
    if "static_query.weight" in group:
        if "query_feat.weight" in group:
            raise ValueError(f"{src_prefix}: both static_query.weight and query_feat.weight present")
        group["query_feat.weight"] = group.pop("static_query.weight")
    out, dropped = {}, {}
    for key, value in group.items():
        if key.startswith("class_embed."):
            dropped[src_prefix + key] = "Mask2Former class classifier; PSALM uses class_head + class conditions"
            continue
        if key == "query_feat.weight":
            dropped[src_prefix + key] = "learned query features; PSALM's query features come from the LLM"
            continue
        if key == "query_embed.weight" and num_queries is not None:
            if value.shape[0] < num_queries:
                raise ValueError(
                    f"{src_prefix}{key} has {value.shape[0]} queries, fewer than the requested {num_queries}"
                )
            value = value[:num_queries].clone()
        out[dst_prefix + key] = value
    return KeyConversion(out, dropped, _head_keys(dst_prefix))
