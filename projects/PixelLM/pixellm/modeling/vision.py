"""PixelLM vision side: CLIP ViT at 448 with a padding-aware attention mask and two layer taps.

The image path of the official code (``clip_encoder.py`` / ``custom_clip.py`` / ``llava_arch.py``):

* ``resize_longest_side`` + SAM/ImageNet normalisation + zero padding bottom/right to S x S
  (:func:`preprocess_clip_image`), S = 448 for the release;
* transformers' ``CLIPVisionModel`` whose position table was interpolated from the pre-training grid
  (24 x 24 for ViT-L/14-336) to (S/14)^2 with :func:`interpolate_position_embedding`;
* attention mask ``[CLS] + nearest((S/14)^2 of the pixel-validity mask)``: a patch is valid iff its
  top-left pixel lies inside the resized image;
* two taps ``hidden_states[-2]`` (LLM tokens and decoder scale 0) and ``hidden_states[-11]``
  (decoder scale 1), patch tokens only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "resize_longest_side_shape",
    "resize_longest_side",
    "preprocess_clip_image",
    "interpolate_position_embedding",
    "patch_validity_mask",
    "PixelLMVisionTower",
]

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def resize_longest_side_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """SAM ``ResizeLongestSide.get_preprocess_shape``: (h', w') with max(h', w') == long_side."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize an RGB uint8 [H, W, 3] image so that its long side is ``long_side`` (PIL bilinear).

    The official code resizes a PIL image with torchvision (= ``PIL.Image.resize(BILINEAR)``).
    """
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    h, w = resize_longest_side_shape(image.shape[0], image.shape[1], long_side)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def preprocess_clip_image(
    image: np.ndarray, size: int, pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD
) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 [H, W, 3] -> (float32 [3, size, size] normalised and zero padded, (h', w')).

    Padding is applied after normalisation (zeros), bottom/right, as the official ``preprocess``.
    """
    resized = resize_longest_side(image, size)
    h, w = resized.shape[:2]
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float()
    x = (x - torch.tensor(pixel_mean).view(-1, 1, 1)) / torch.tensor(pixel_std).view(-1, 1, 1)
    x = F.pad(x, (0, size - w, 0, size - h))
    return x, (h, w)


def interpolate_position_embedding(weight: torch.Tensor, new_grid: int, compat: bool = True) -> torch.Tensor:
    """Resize a CLIP position table [1 + g*g, C] to [1 + new_grid^2, C] (bilinear, align_corners=False).

    ``compat=True`` reproduces the official code (``clip_encoder.py``): it takes ``weight[-1:]`` as
    the CLS row and ``weight[:-1]`` as the g x g grid, although transformers' CLIP stores CLS at row
    0, and appends the "CLS" row at the end. The released weights were trained with this table.
    ``compat=False`` interpolates the grid ``weight[1:]`` and keeps CLS at row 0 (the intended
    behaviour). The interpolation runs in the table's dtype (fp32 for the release, as the official
    load does).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a [1 + g*g, C] position table, got shape {tuple(weight.shape)}")
    n, c = weight.shape
    g = int(round((n - 1) ** 0.5))
    if g * g != n - 1:
        raise ValueError(f"position table has {n} rows, not 1 + g*g")
    if compat:
        cls, grid = weight[-1:], weight[:-1]
    else:
        cls, grid = weight[:1], weight[1:]
    grid = grid.permute(1, 0).reshape(1, c, g, g)
    grid = F.interpolate(grid, (new_grid, new_grid), mode="bilinear", align_corners=False)[0]
    grid = grid.flatten(1).permute(1, 0)
    return torch.cat([grid, cls], dim=0) if compat else torch.cat([cls, grid], dim=0)


def patch_validity_mask(valid_sizes: Sequence[Sequence[int]], size: int, grid: int, device=None) -> torch.Tensor:
    """[B, grid, grid] float mask: 1 where the patch's top-left pixel is inside the resized image.

    Equals the official ``F.interpolate(pixel_mask, (grid, grid), mode="nearest")``.
    """
    mask = torch.zeros(len(valid_sizes), size, size, device=device)
    for i, (h, w) in enumerate(valid_sizes):
        mask[i, : int(h), : int(w)] = 1
    return F.interpolate(mask[:, None], size=(grid, grid), mode="nearest")[:, 0]


class PixelLMVisionTower(nn.Module):
    """transformers ``CLIPVisionModel`` (frozen) with a padding mask and two hidden-state taps.

    Args:
        clip: a ``CLIPVisionModel`` whose ``config.image_size`` is the input size S (448).
        taps: ``hidden_states`` indices; ``taps[0]`` feeds the LLM and decoder scale 0.
        llm_grid: side of the LLM token map (16 for the release).
        pad_aware: pass the padding mask to the attention (official ``pad_train_clip_images``).
    """

    def __init__(self, clip, taps: Sequence[int] = (-2, -11), llm_grid: int = 16, pad_aware: bool = True):
        super().__init__()
        self.clip = clip
        self.taps = tuple(int(t) for t in taps)
        self.llm_grid = int(llm_grid)
        self.pad_aware = bool(pad_aware)
        cfg = clip.config
        self.image_size = int(cfg.image_size)
        self.patch_size = int(cfg.patch_size)
        self.grid = self.image_size // self.patch_size
        n_states = cfg.num_hidden_layers + 1
        for t in self.taps:
            if not -n_states <= t < n_states or t % n_states == 0:
                raise ValueError(
                    f"vision tap {t} is not an encoder-layer output of a {cfg.num_hidden_layers}-layer CLIP "
                    f"(hidden_states has {n_states} entries, index 0 is the embedding output)"
                )

    @property
    def hidden_size(self) -> int:
        return int(self.clip.config.hidden_size)

    def forward(self, images: torch.Tensor, valid_sizes: Sequence[Sequence[int]]) -> dict:
        """
        Args:
            images: [B, 3, S, S] normalised, zero-padded images.
            valid_sizes: B pairs (h', w'), the resized image size inside the padded input.

        Returns:
            dict with ``taps``: list of [B, G*G, C] patch features (G = S/14), one per tap;
            ``attention_mask`` [B, 1 + G*G] bool (CLS first); ``llm_mask`` [B, g*g] bool for the
            g x g LLM tokens; ``hidden_states_0`` [B, 1 + G*G, C].
        """
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        vm = getattr(self.clip, "vision_model", self.clip)
        b = images.shape[0]
        patch = patch_validity_mask(valid_sizes, self.image_size, self.grid, device=images.device)
        llm_mask = F.interpolate(patch[:, None], size=(self.llm_grid, self.llm_grid), mode="nearest")[:, 0]
        attn = torch.cat([torch.ones(b, 1, device=images.device), patch.flatten(1)], dim=1)
        embeds = vm.pre_layrnorm(vm.embeddings(images.to(vm.embeddings.patch_embedding.weight.dtype)))
        additive = None
        if self.pad_aware:
            # [B, 1, L, L] additive key mask (transformers' 4.31 ``_expand_mask`` semantics)
            additive = (1.0 - attn.to(embeds.dtype))[:, None, None, :].expand(b, 1, attn.shape[1], attn.shape[1])
            additive = additive * torch.finfo(embeds.dtype).min
        states = [embeds]
        h = embeds
        for layer in vm.encoder.layers:
            h = layer(h, additive)
            h = h[0] if isinstance(h, tuple) else h
            states.append(h)
        return {
            "taps": [states[t][:, 1:] for t in self.taps],
            "attention_mask": attn.bool(),
            "llm_mask": llm_mask.flatten(1).bool(),
            "hidden_states_0": states[0],
        }
