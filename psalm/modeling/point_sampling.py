"""Point sampling for the mask losses and the matcher (PointRend / Mask2Former semantics).

Masks are compared on a set of points instead of on full-resolution maps: predictions live at
stride 4 ([h, w] = [S/4, S/4]) while the ground truth lives at the padded input size [S, S], and
normalised coordinates make the two directly comparable without upsampling.

Coordinates are ``(x, y)`` in ``[0, 1] x [0, 1]``, where ``(0, 0)`` is the top-left corner of the
map and ``(1, 1)`` its bottom-right corner (``align_corners=False`` convention: the centre of pixel
``(row i, col j)`` of an ``H x W`` map is ``((j + 0.5) / W, (i + 0.5) / H)``).
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "point_sample",
    "calculate_uncertainty",
    "get_uncertain_point_coords_with_randomness",
]


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Bilinearly sample ``input`` at normalised points (``F.grid_sample`` with zero padding).

    Args:
        input: [N, C, H, W] maps.
        point_coords: [N, P, 2] or [N, Hp, Wp, 2] ``(x, y)`` coordinates in ``[0, 1]``.
        **kwargs: passed to ``F.grid_sample`` (callers in this package pass
            ``align_corners=False``).

    Returns:
        [N, C, P] (or [N, C, Hp, Wp] for 4-d ``point_coords``).
    """
    if point_coords.dim() not in (3, 4) or point_coords.shape[-1] != 2:
        raise ValueError(
            f"point_coords must be [N, P, 2] or [N, Hp, Wp, 2], got shape {tuple(point_coords.shape)}"
        )
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, **kwargs)
    if add_dim:
        output = output.squeeze(3)
    return output


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of class-agnostic mask logits: ``-|logit|`` (highest at the decision boundary).

    Args:
        logits: [R, 1, ...] mask logits.

    Returns:
        [R, 1, ...] uncertainty scores.
    """
    if logits.shape[1] != 1:
        raise ValueError(f"expected class-agnostic logits [R, 1, ...], got shape {tuple(logits.shape)}")
    return -torch.abs(logits)


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Importance sampling of points (PointRend): most uncertain of an oversampled set plus random.

    ``int(num_points * oversample_ratio)`` points are drawn uniformly, the
    ``int(importance_sample_ratio * num_points)`` most uncertain of them (per mask) are kept, and
    the remainder up to ``num_points`` is drawn uniformly again.

    Args:
        coarse_logits: [R, 1, h, w] mask logits (R masks).
        uncertainty_func: maps [R, 1, P] point logits to [R, 1, P] uncertainties
            (:func:`calculate_uncertainty`).
        num_points: P, points per mask.
        oversample_ratio: >= 1.
        importance_sample_ratio: in [0, 1].
        generator: optional ``torch.Generator`` for reproducible sampling.

    Returns:
        [R, P, 2] ``(x, y)`` coordinates in ``[0, 1]``.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_masks = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_masks, num_sampled, 2, device=device, generator=generator)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    # The uncertainty is computed on the sampled point logits rather than on the coarse map, so
    # that points are not biased toward coarse-map pixel centres.
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]  # [R, num_uncertain]
    point_coords = torch.gather(point_coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        random_coords = torch.rand(num_masks, num_random, 2, device=device, generator=generator)
        point_coords = torch.cat([point_coords, random_coords], dim=1)
    return point_coords
