"""Multi-scale deformable attention (Deformable DETR), with an explicit choice of implementation.

Two interchangeable implementations of the core op are available:

* ``"pytorch"``: a pure-PyTorch reference built on ``F.grid_sample`` (always available, any device,
  differentiable, also used for double-backward-free checks);
* ``"kernel"``: the compiled CPU/CUDA kernel of the ``torch-ms-deform-attn`` package
  (``torch_ms_deform_attn.ms_deform_attn``), faster and lighter on memory.

``"auto"`` picks the kernel when the package imports and the reference otherwise, and logs the
choice once. ``"kernel"`` raises if the package is missing. There is no silent fallback at call time
(the official code wraps the kernel in a bare ``except:``).

Precision: sampling offsets, attention weights (softmax) and the sampling itself are computed in
float32 (float64 when the inputs are float64) with autocast disabled, so bf16/fp16 training does
not quantise the sampling locations (a bf16 location is off by up to 1/256 of the map).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "MSDeformAttn",
    "DEFORM_ATTN_IMPLS",
    "resolve_deform_attn_impl",
    "ms_deform_attn_pytorch",
    "ms_deform_attn_kernel",
    "multi_scale_deformable_attention",
]

DEFORM_ATTN_IMPLS = ("auto", "pytorch", "kernel")
_logged_auto_choice = False


def _import_kernel():
    """The compiled op, or the ImportError explaining why it is unavailable."""
    try:
        from torch_ms_deform_attn import ms_deform_attn
    except ImportError as e:
        return None, e
    return ms_deform_attn, None


def resolve_deform_attn_impl(impl: str) -> str:
    """Map a ``MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL`` value to ``"pytorch"`` or ``"kernel"``."""
    global _logged_auto_choice
    if impl not in DEFORM_ATTN_IMPLS:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL={impl!r}; expected one of {DEFORM_ATTN_IMPLS}")
    if impl == "pytorch":
        return impl
    kernel, err = _import_kernel()
    if impl == "kernel":
        if kernel is None:
            raise RuntimeError(
                "MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL='kernel' but the compiled multi-scale deformable "
                f"attention is not importable ({err}). Install it with scripts/install.sh "
                "(package torch-ms-deform-attn), or set DEFORM_ATTN_IMPL to 'pytorch' or 'auto'."
            )
        return "kernel"
    choice = "kernel" if kernel is not None else "pytorch"
    if not _logged_auto_choice:
        _logged_auto_choice = True
        if kernel is not None:
            logger.info("Multi-scale deformable attention: using the compiled kernel (torch-ms-deform-attn).")
        else:
            logger.warning(
                "Multi-scale deformable attention: torch-ms-deform-attn is not importable (%s); using the "
                "pure-PyTorch reference (slower, more memory).",
                err,
            )
    return choice


def _level_shapes(spatial_shapes, num_values: int) -> list[tuple[int, int]]:
    """(H_l, W_l) per level as Python ints: from a list as given, from a tensor through ``tolist()``
    (a device-to-host copy: pass the list on hot paths)."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if sum(h * w for h, w in shapes) != num_values:
        raise ValueError(
            f"spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} positions, value has {num_values}"
        )
    return shapes


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference multi-scale deformable attention with ``F.grid_sample``.

    Args:
        value: [N, S, M, D], the flattened levels of all maps (S = sum of H_l * W_l), M heads.
        spatial_shapes: [L, 2] int64 (H_l, W_l), or the same as a list of L (H_l, W_l) int pairs
            (no device-to-host copy).
        sampling_locations: [N, Lq, M, L, P, 2], normalised (x, y) in [0, 1] (pixel centres at
            (i + 0.5) / size); outside points read zeros.
        attention_weights: [N, Lq, M, L, P], used as given.
    Returns:
        [N, Lq, M * D].
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = _level_shapes(spatial_shapes, S)
    grids = sampling_locations * 2 - 1  # grid_sample convention, align_corners=False
    per_level = value.split([h * w for h, w in shapes], dim=1)
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(N * M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=3)  # [N*M, D, Lq, L, P]
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(N * M, 1, Lq, L, P)
    out = (sampled * weights).flatten(3).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


def ms_deform_attn_kernel(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int = 64,
) -> torch.Tensor:
    """The compiled op (same contract as :func:`ms_deform_attn_pytorch`); float32/float64 inputs."""
    kernel, err = _import_kernel()
    if kernel is None:
        raise RuntimeError(f"torch-ms-deform-attn is not importable ({err}); use the 'pytorch' implementation")
    return kernel(
        value, spatial_shapes.long(), level_start_index.long(), sampling_locations, attention_weights, im2col_step
    )


def multi_scale_deformable_attention(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    impl: str = "pytorch",
    im2col_step: int = 64,
    spatial_shapes_list: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Dispatch to the implementation ``impl`` (``"pytorch"`` or ``"kernel"``; resolve ``"auto"`` first).

    ``spatial_shapes_list``: ``spatial_shapes`` as Python ints, if the caller has them; the PyTorch
    path then needs no ``spatial_shapes.tolist()`` host sync (the kernel reads the tensor).
    """
    if impl == "kernel":
        return ms_deform_attn_kernel(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
        )
    if impl == "pytorch":
        shapes = spatial_shapes if spatial_shapes_list is None else spatial_shapes_list
        return ms_deform_attn_pytorch(value, shapes, sampling_locations, attention_weights)
    raise ValueError(f"impl must be 'pytorch' or 'kernel' here (resolve 'auto' first); got {impl!r}")


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR / Mask2Former parameter names).

    Each query attends to ``n_points`` sampled points per head and level around its reference point;
    the sampling offsets and the attention weights are linear functions of the query.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
        im2col_step: int = 128,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.im2col_step = im2col_step
        self.impl = resolve_deform_attn_impl(impl)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Deformable DETR init: offsets start on a ring of ``n_heads`` directions, 1..P steps out."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True)[0]  # on the unit square
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = dirs.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * steps
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
        spatial_shapes_list: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, C] (content + positional embedding).
            reference_points: [N, Lq, L, 2], normalised (x, y) per level.
            input_flatten: [N, S, C], the values (all levels flattened, S = sum H_l * W_l).
            input_spatial_shapes: [L, 2] int64 (H_l, W_l); input_level_start_index: [L] int64.
            input_padding_mask: [N, S] bool, True = padding (its values are zeroed), or None.
            spatial_shapes_list: ``input_spatial_shapes`` as L (H_l, W_l) Python int pairs (the
                encoder passes them: no host sync per layer), or None to read the tensor.
        Returns:
            [N, Lq, C]
        """
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if reference_points.shape[-1] != 2 or reference_points.shape[2] != L:
            raise ValueError(
                f"reference_points must be [N, Lq, {L}, 2] (points; boxes are not supported); "
                f"got {tuple(reference_points.shape)}"
            )
        if input_spatial_shapes.shape[0] != L:
            raise ValueError(f"module built for {L} levels, got spatial_shapes for {input_spatial_shapes.shape[0]}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        compute = torch.float64 if value.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=query.device.type, enabled=False):
            q = query.to(compute)
            offsets = F.linear(q, self.sampling_offsets.weight.to(compute), self.sampling_offsets.bias.to(compute))
            logits = F.linear(q, self.attention_weights.weight.to(compute), self.attention_weights.bias.to(compute))
            weights = logits.view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
            normalizer = input_spatial_shapes.flip(-1).to(compute)  # (W, H) per level
            locations = reference_points.to(compute)[:, :, None, :, None, :] + (
                offsets.view(N, Lq, M, L, P, 2) / normalizer[None, None, None, :, None, :]
            )
            out = multi_scale_deformable_attention(
                value.to(compute).view(N, S, M, self.d_model // M),
                input_spatial_shapes,
                input_level_start_index,
                locations,
                weights,
                self.impl,
                self.im2col_step,
                spatial_shapes_list,
            )
        return self.output_proj(out.to(query.dtype))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}, impl={self.impl}"
