"""PixelLM mask losses on order-matched masks (no Hungarian matching in training).

``loss_mask`` = BCE_WEIGHT * mean over masks of the per-mask mean BCE, ``loss_dice`` = DICE_WEIGHT *
mean over masks of the dice loss, every mask of the batch weighted equally (official
``model_forward``). Two evaluation domains:

* ``num_points == 0`` (official): every pixel of the masks at the original image size, with the
  official dice ``1 - (2 sum(p t) + 1e-3) / (sum p + sum t + 1e-3)`` (the code's ``scale=1000,
  eps=1e-6``): psalm's ``dice_loss`` with ``smooth=1e-3`` instead of Mask2Former's 1;
* ``num_points > 0``: psalm's point sampling (importance sampling on the predicted logits) and
  psalm's ``sigmoid_ce_loss`` / ``dice_loss``.

Target refinement loss (paper Sec. 3.2, ``trl=True``): per question, pixels claimed (logit > 0)
by >= 2 of that question's predicted masks get weight ``alpha`` instead of 1 in the BCE. Reported
as the extra term ``loss_trl = BCE_WEIGHT * (alpha - 1) * mean_k mean_i[overlap_i * BCE_k,i]``, so
``loss_mask + loss_trl`` is the paper's ``lambda_ref * L_ref``. Questions are delimited by the number
of targets of each question (the official code's ``count // N*L`` precedence bug, which made its
grouping 4x too large and crash, is not reproduced).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from psalm.modeling.criterion import dice_loss as m2f_dice_loss  # Mask2Former's by default (smooth 1)
from psalm.modeling.criterion import sigmoid_ce_loss
from psalm.modeling.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

__all__ = ["PixelLMMaskLoss", "official_dice_loss", "overlap_weights"]


OFFICIAL_DICE_SMOOTH = 1e-3  # the official scale=1000, eps=1e-6, in pixel units


def official_dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """PixelLM/LISA dice on [M, P] logits / targets, summed over masks, divided by ``num_masks``: psalm's
    ``dice_loss`` with the official smoothing (the same function up to float rounding)."""
    return m2f_dice_loss(inputs, targets, num_masks, smooth=OFFICIAL_DICE_SMOOTH)


def overlap_weights(logits: torch.Tensor, targets_per_question: Sequence[int]) -> torch.Tensor:
    """[M, H, W] bool: pixel claimed (logit > 0) by >= 2 masks of the same question."""
    if sum(int(k) for k in targets_per_question) != logits.shape[0]:
        raise ValueError(f"targets per question {list(targets_per_question)} do not add up to {logits.shape[0]} masks")
    out = torch.zeros_like(logits, dtype=torch.bool)
    start = 0
    for k in targets_per_question:
        k = int(k)
        if k:
            claimed = (logits[start : start + k] > 0).sum(0) >= 2
            out[start : start + k] = claimed
        start += k
    return out


class PixelLMMaskLoss(nn.Module):
    def __init__(self, bce_weight: float = 2.0, dice_weight: float = 0.5, num_points: int = 0,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 trl: bool = False, trl_alpha: float = 2.0):
        super().__init__()
        self.bce_weight, self.dice_weight = float(bce_weight), float(dice_weight)
        self.num_points = int(num_points)
        self.oversample_ratio, self.importance_sample_ratio = oversample_ratio, importance_sample_ratio
        self.trl, self.trl_alpha = bool(trl), float(trl_alpha)
        if self.trl and self.trl_alpha < 1:
            raise ValueError(f"TRL_ALPHA must be >= 1, got {trl_alpha}")

    def forward(self, preds: Sequence[torch.Tensor], gts: Sequence[torch.Tensor],
                targets_per_question: Sequence[Sequence[int]]) -> dict:
        """
        Args:
            preds: per image [K_i, H_i, W_i] mask logits (original size).
            gts: per image [K_i, H_i, W_i] bool / {0,1} masks, same order.
            targets_per_question: per image, the number of targets of each of its questions.
        """
        zero = sum(p.sum() for p in preds) * 0.0
        bce, dice, trl = zero, zero, zero
        total = sum(int(g.shape[0]) for g in gts)
        for pred, gt, groups in zip(preds, gts, targets_per_question):
            k = pred.shape[0]
            if k == 0:
                continue
            gt = gt.to(pred.dtype)
            over = overlap_weights(pred.detach(), groups).to(pred.dtype) if self.trl else None
            if self.num_points > 0:
                coords = get_uncertain_point_coords_with_randomness(
                    pred[:, None].detach(), calculate_uncertainty, self.num_points,
                    self.oversample_ratio, self.importance_sample_ratio)
                x = point_sample(pred[:, None], coords, align_corners=False)[:, 0]
                t = point_sample(gt[:, None], coords, align_corners=False)[:, 0]
                if over is not None:
                    over = point_sample(over[:, None], coords, mode="nearest", align_corners=False)[:, 0]
                bce = bce + sigmoid_ce_loss(x, t, 1.0)
                dice = dice + m2f_dice_loss(x, t, 1.0)
            else:
                x, t = pred.flatten(1), gt.flatten(1)
                over = over.flatten(1) if over is not None else None
                bce = bce + sigmoid_ce_loss(x, t, 1.0)
                dice = dice + official_dice_loss(x, t, 1.0)
            if over is not None:
                per_pixel = F.binary_cross_entropy_with_logits(x, t, reduction="none")
                trl = trl + (per_pixel * over).mean(1).sum()
        denom = total + 1e-8
        out = {"loss_mask": self.bce_weight * bce / denom, "loss_dice": self.dice_weight * dice / denom}
        if self.trl:
            out["loss_trl"] = self.bce_weight * (self.trl_alpha - 1.0) * trl / denom
        return out
