"""Image -> patches and visual-prompt masks -> patch masks (spec B1.1, official ``dataset/utils.py``).

Resize rule: long side ``L' = min(ceil(L / p) * p, max_side)``; short side
``S' = ceil(round(L' * S / L) / p) * p``; both are multiples of ``p``. Pixels are scaled to [0, 1] and
normalised with the ImageNet mean / std, then cut into non-overlapping ``p x p`` patches in row-major
order (row r, column c -> index ``r * w + c``), each flattened as ``(c, py, px)`` (channel-major, the
``unfold`` order) to ``3 p^2`` values. The flattening order is not stated in the spec; a converted
checkpoint whose ``vis_embed`` used another order would need its columns permuted.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["official_resize_hw", "preprocess_image", "patchify", "mask_to_patches"]


def official_resize_hw(height: int, width: int, patch_size: int, max_side: int) -> Tuple[int, int]:
    """(new_height, new_width) of the official resize rule (module docstring)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if max_side % patch_size:
        raise ValueError(f"max_side {max_side} must be a multiple of the patch size {patch_size}")
    long, short = max(height, width), min(height, width)
    new_long = min(math.ceil(long / patch_size) * patch_size, max_side)
    new_short = max(math.ceil(round(new_long * short / long) / patch_size) * patch_size, patch_size)
    return (new_long, new_short) if height >= width else (new_short, new_long)


def preprocess_image(rgb: np.ndarray, patch_size: int, max_side: int, mean: Sequence[float],
                     std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB [H, W, 3] (or a [3, H, W] uint8 tensor) -> normalised float [3, H', W'] (official resize,
    bilinear with antialiasing)."""
    img = torch.from_numpy(np.array(rgb)) if isinstance(rgb, np.ndarray) else rgb
    if img.dim() != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] or [3, H, W], got shape {tuple(img.shape)}")
    if img.shape[0] != 3 and img.shape[-1] == 3:
        img = img.permute(2, 0, 1)
    if img.shape[0] != 3:
        raise ValueError(f"expected 3 channels, got shape {tuple(img.shape)}")
    h, w = official_resize_hw(img.shape[1], img.shape[2], patch_size, max_side)
    x = img.float()[None] / 255.0
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s)[0]


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[3, H, W] (multiples of p) -> [h * w, 3 p^2] row-major patches, each flattened (c, py, px)."""
    c, hh, ww = pixels.shape
    p = patch_size
    if hh % p or ww % p:
        raise ValueError(f"image {hh} x {ww} is not a multiple of the patch size {p}; use preprocess_image")
    x = pixels.reshape(c, hh // p, p, ww // p, p).permute(1, 3, 0, 2, 4)  # [h, w, c, p, p]
    return x.reshape((hh // p) * (ww // p), c * p * p)


def mask_to_patches(mask: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """bool [R, H0, W0] (original size) -> bool [R, h, w]: a patch is covered if ANY pixel is.

    The mask is first mapped to the resized image ``(h * p, w * p)`` by nearest neighbour (the official
    code resizes the prompt mask with the image), then max-pooled per patch; with a mask already at
    the resized size, this is exactly "any pixel of the patch".
    """
    if mask.dim() != 3:
        raise ValueError(f"masks must be [R, H, W], got shape {tuple(mask.shape)}")
    h, w = grid_hw
    m = mask.float()[None]
    if m.shape[-2] % h or m.shape[-1] % w:
        # nearest resize to a multiple of the grid first, so that every patch pools whole pixels
        sy = max(math.ceil(m.shape[-2] / h), 1)
        sx = max(math.ceil(m.shape[-1] / w), 1)
        m = F.interpolate(m, size=(h * sy, w * sx), mode="nearest")
    return F.adaptive_max_pool2d(m, (h, w))[0] > 0
