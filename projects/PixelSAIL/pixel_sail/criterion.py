"""Pixel-SAIL training losses (spec B2.1): point-sampled BCE x 2 + Dice x 0.5 on identity-matched
(answer-order) [SEG] / GT pairs, plus the scaled LM loss.

psalm's kernels are reused: Mask2Former uncertainty point sampling
(``psalm.modeling.point_sampling``) and ``sigmoid_ce_loss`` / ``dice_loss`` (sigmoid BCE averaged over
points, Dice with +1 smoothing; each summed over masks and divided by the number of masks), and
``next_token_loss``. There is no Hungarian matching: the i-th ``[SEG]`` of a sample is the i-th GT mask.

A sample whose ``[SEG]`` count differs from its GT count is truncated to the shorter of the two and
its mask terms get weight 0 (the official behaviour, never a crash); such samples are counted
(``num_mismatched`` of the returned stats). The number of masks that divides the sums counts only
weighted masks (clamped to >= 1).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from torch import nn

from psalm.modeling.criterion import dice_loss, next_token_loss, sigmoid_ce_loss
from psalm.modeling.point_sampling import (calculate_uncertainty, get_uncertain_point_coords_with_randomness,
                                           point_sample)

__all__ = ["PixelSAILCriterion", "match_seg_to_gt"]


def match_seg_to_gt(num_seg: int, num_gt: int) -> Tuple[int, float]:
    """(pairs used, mask weight) for one sample: identity pairs up to min(n_seg, n_gt); weight 0 if the
    counts differ."""
    return min(num_seg, num_gt), (1.0 if num_seg == num_gt else 0.0)


class PixelSAILCriterion(nn.Module):
    @configurable
    def __init__(self, *, bce_weight: float = 2.0, dice_weight: float = 0.5, llm_weight: float = 1.0,
                 llm_weight_with_masks: float = 0.1, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75):
        super().__init__()
        self.bce_weight, self.dice_weight = float(bce_weight), float(dice_weight)
        self.llm_weight, self.llm_weight_with_masks = float(llm_weight), float(llm_weight_with_masks)
        self.num_points, self.oversample_ratio = int(num_points), float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)

    @classmethod
    def from_config(cls, cfg):
        lo = cfg.MODEL.PIXEL_SAIL.LOSS
        return dict(bce_weight=lo.BCE_WEIGHT, dice_weight=lo.DICE_WEIGHT, llm_weight=lo.LLM_WEIGHT,
                    llm_weight_with_masks=lo.LLM_WEIGHT_WITH_MASKS, num_points=lo.NUM_POINTS,
                    oversample_ratio=lo.OVERSAMPLE_RATIO, importance_sample_ratio=lo.IMPORTANCE_SAMPLE_RATIO)

    def sample_points(self, logits: torch.Tensor) -> torch.Tensor:
        """[M, 1, h, w] logits -> [M, P, 2] points (override in tests)."""
        return get_uncertain_point_coords_with_randomness(
            logits, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio)

    def mask_losses(self, pred_masks: List[torch.Tensor], gt_masks: List[Optional[torch.Tensor]]):
        """pred_masks: per sample [n_seg, h, w] logits; gt_masks: per sample [n_gt, H, W] (or None = no
        mask target). Returns (loss_mask, loss_dice) (weighted) and stats, or (None, None, stats) when no
        sample of the batch has masks."""
        pairs, weights, targets = [], [], []
        mismatched, has_masks = 0, False
        for pred, gt in zip(pred_masks, gt_masks):
            n_seg = 0 if pred is None else len(pred)
            n_gt = 0 if gt is None else len(gt)
            if n_seg == 0 and n_gt == 0:
                continue
            has_masks = True
            n, w = match_seg_to_gt(n_seg, n_gt)
            mismatched += int(w == 0.0)
            for i in range(n):
                pairs.append(pred[i][None, None].float())
                targets.append(gt[i][None, None].float())
                weights.append(w)
        stats = {"num_mismatched": mismatched, "num_pairs": len(pairs)}
        if not has_masks:
            return None, None, stats
        if not pairs:  # masks expected but no pair (e.g. no [SEG] predicted): zero losses
            zero = sum(p.sum() for p in pred_masks if p is not None) * 0.0 if any(
                p is not None for p in pred_masks) else torch.zeros(())
            return zero, zero, stats
        wt = torch.tensor(weights, device=pairs[0].device)
        num_masks = max(float(wt.sum()), 1.0)
        bces, dices = [], []
        for logit, target in zip(pairs, targets):
            with torch.no_grad():
                coords = self.sample_points(logit)  # [1, P, 2]
                labels = point_sample(target.to(logit.device), coords, align_corners=False).squeeze(1)
            pl = point_sample(logit, coords, align_corners=False).squeeze(1)  # [1, P]
            bces.append(sigmoid_ce_loss(pl, labels, 1.0))
            dices.append(dice_loss(pl, labels, 1.0))
        loss_bce = (torch.stack(bces) * wt).sum() / num_masks
        loss_dice = (torch.stack(dices) * wt).sum() / num_masks
        return self.bce_weight * loss_bce, self.dice_weight * loss_dice, stats

    def llm_scale(self, has_mask_loss: bool) -> float:
        return self.llm_weight_with_masks if has_mask_loss else self.llm_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, pred_masks, gt_masks) -> Tuple[Dict, Dict]:
        """logits [B, L, V], labels [B, L]; mask lists as :meth:`mask_losses`. Returns (losses, stats)."""
        loss_mask, loss_dice, stats = self.mask_losses(pred_masks, gt_masks)
        has = loss_mask is not None
        losses = {"loss_lm": self.llm_scale(has) * next_token_loss(logits, labels)}
        if has:
            losses.update(loss_mask=loss_mask, loss_dice=loss_dice)
        stats["llm_scale"] = self.llm_scale(has)
        return losses, stats
