"""Hungarian matching between predicted masks and ground-truth masks, on sampled points.

One matcher for every segmentation task (official ``hungarian_matcher_PSALM``, the memory-efficient
Mask2Former matcher):

    C[q, n] = MASK_WEIGHT * BCE(q, n) + DICE_WEIGHT * dice(q, n) [+ CLASS_WEIGHT * (-p_q(class_n))]

computed on ``TRAIN_NUM_POINTS`` points drawn uniformly at random (shared by all predictions and
targets of one image; :meth:`HungarianMatcher.sample_targets` draws them and samples the targets once, so
that the criterion's deep-supervision stages share them). The class term is used only when class logits are given, i.e. for the
category tasks (panoptic / instance / semantic); referring and interactive match on masks only.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from detectron2.config import configurable

from .point_sampling import point_sample

__all__ = ["HungarianMatcher", "batch_sigmoid_ce_cost", "batch_dice_cost"]


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean sigmoid binary cross-entropy.

    Args:
        inputs: [Q, P] logits of Q predictions at P points.
        targets: [N, P] targets in [0, 1] of N ground-truth masks at the same points.

    Returns:
        [Q, N]: ``cost[q, n] = mean_p BCE(inputs[q, p], targets[n, p])``.
    """
    num_points = inputs.shape[1]
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x)
    pos = nn.functional.softplus(-inputs)
    neg = nn.functional.softplus(inputs)
    cost = torch.einsum("qp,np->qn", pos, targets) + torch.einsum("qp,np->qn", neg, 1.0 - targets)
    return cost / num_points


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise dice loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with ``p = sigmoid(inputs)``.

    Args:
        inputs: [Q, P] logits.
        targets: [N, P] targets in [0, 1].

    Returns:
        [Q, N] dice costs.
    """
    probs = inputs.sigmoid()
    numerator = 2.0 * torch.einsum("qp,np->qn", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions (queries) to ground-truth masks per image.

    Call with ``pred_masks`` [B, Q, h, w] (mask logits, any stride), ``targets`` (list of B dicts
    with ``"masks"`` [N_b, H, W] bool/float at the padded input size and, for the class term,
    ``"labels"`` long [N_b]) and optionally ``pred_class_logits`` [B, Q, K+1].

    Returns a list of B pairs ``(query_idx, target_idx)`` of int64 CPU tensors of equal length
    ``min(Q, N_b)``: query ``query_idx[i]`` is matched to target ``target_idx[i]``. Images without
    targets give two empty tensors.
    """

    @configurable
    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 112 * 112,
    ):
        super().__init__()
        if num_points <= 0:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.num_points = int(num_points)

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        return {
            "cost_class": mf.CLASS_WEIGHT,
            "cost_mask": mf.MASK_WEIGHT,
            "cost_dice": mf.DICE_WEIGHT,
            "num_points": mf.TRAIN_NUM_POINTS,
        }

    def sample_points(self, num_points: int, device: torch.device) -> torch.Tensor:
        """[1, P, 2] uniform ``(x, y)`` points in [0, 1] (override in tests for fixed points)."""
        return torch.rand(1, num_points, 2, device=device)

    @torch.no_grad()
    def sample_targets(
        self, targets: Sequence[Dict[str, torch.Tensor]], device: torch.device
    ) -> List[Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """Per image: ``(points [1, P, 2], target values [N_b, P] float32)``, the uniform points of
        :meth:`sample_points` and the GT masks sampled there (None for an image without targets).

        A caller that matches several predictions of one batch (the criterion's deep-supervision stages)
        draws them once and passes them to every :meth:`forward` (``sampled_targets``): each GT mask is cast
        and point-sampled once per batch instead of once per stage."""
        out = []
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            for t in targets:
                masks = t["masks"]
                if masks.shape[0] == 0:
                    out.append(None)
                    continue
                points = self.sample_points(self.num_points, device)
                tgt = point_sample(
                    masks.to(device)[:, None].float(), points.expand(masks.shape[0], -1, -1), align_corners=False
                ).squeeze(1)
                out.append((points, tgt))
        return out

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_masks: torch.Tensor,
        target_masks: torch.Tensor,
        pred_class_logits: Optional[torch.Tensor] = None,
        target_labels: Optional[torch.Tensor] = None,
        sampled: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Matching cost of one image, always computed in float32 with autocast disabled (an fp32 island,
        as Mask2Former's matcher: a bf16 cost matrix changes the assignment).

        Args:
            pred_masks: [Q, h, w] mask logits.
            target_masks: [N, H, W] (N >= 1) binary masks.
            pred_class_logits: [Q, K+1] or None (no class term).
            target_labels: [N] long class ids in [0, K), required with ``pred_class_logits``.
            sampled: this image's entry of :meth:`sample_targets` (points and sampled targets), or None
                to draw new points here.

        Returns:
            [Q, N] float32 cost matrix.
        """
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            num_queries, num_targets = pred_masks.shape[0], target_masks.shape[0]
            if sampled is None:
                points = self.sample_points(self.num_points, pred_masks.device)
                tgt = point_sample(
                    target_masks[:, None].float(), points.expand(num_targets, -1, -1), align_corners=False
                ).squeeze(1)
            else:
                points, tgt = sampled
                if tgt.shape[0] != num_targets:
                    raise ValueError(f"sampled targets hold {tgt.shape[0]} masks, the image has {num_targets}")
            out = point_sample(
                pred_masks[:, None].float(), points.expand(num_queries, -1, -1), align_corners=False
            ).squeeze(1)
            cost = self.cost_mask * batch_sigmoid_ce_cost(out, tgt) + self.cost_dice * batch_dice_cost(out, tgt)
            if pred_class_logits is not None:
                if target_labels is None:
                    raise ValueError("the class cost needs targets[b]['labels'] (long [N])")
                num_classes = pred_class_logits.shape[-1]
                if target_labels.numel() and (target_labels.min() < 0 or target_labels.max() >= num_classes):
                    raise ValueError(
                        f"target labels must lie in [0, {num_classes}) for class logits with "
                        f"{num_classes} entries (K classes + background); got "
                        f"[{int(target_labels.min())}, {int(target_labels.max())}]"
                    )
                prob = pred_class_logits.float().softmax(-1)  # [Q, K+1]
                cost = cost - self.cost_class * prob[:, target_labels.to(prob.device)]
        return cost

    @torch.no_grad()
    def cost_matrices(
        self,
        pred_masks: torch.Tensor,
        targets: Sequence[Dict[str, torch.Tensor]],
        pred_class_logits: Optional[torch.Tensor] = None,
        sampled_targets: Optional[Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None,
    ) -> List[Optional[torch.Tensor]]:
        """One [Q, N_b] float32 :meth:`cost_matrix` per image (None for an image without targets);
        ``sampled_targets``: :meth:`sample_targets` of these targets (None: new points per image here)."""
        if pred_masks.dim() != 4:
            raise ValueError(f"pred_masks must be [B, Q, h, w], got shape {tuple(pred_masks.shape)}")
        batch_size = pred_masks.shape[0]
        if len(targets) != batch_size:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {batch_size} predictions")
        if pred_class_logits is not None and pred_class_logits.shape[:2] != pred_masks.shape[:2]:
            raise ValueError(
                f"pred_class_logits {tuple(pred_class_logits.shape)} does not match pred_masks "
                f"{tuple(pred_masks.shape)} in [B, Q]"
            )
        if sampled_targets is not None and len(sampled_targets) != batch_size:
            raise ValueError(f"sampled_targets has {len(sampled_targets)} entries for a batch of {batch_size}")
        costs = []
        for b in range(batch_size):
            target_masks = targets[b]["masks"]
            if target_masks.shape[0] == 0:
                costs.append(None)
                continue
            costs.append(self.cost_matrix(
                pred_masks[b],
                target_masks.to(pred_masks.device),
                None if pred_class_logits is None else pred_class_logits[b],
                targets[b].get("labels"),
                None if sampled_targets is None else sampled_targets[b],
            ))
        return costs

    @staticmethod
    def assign(cost: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(query_idx, target_idx)`` int64 CPU tensors minimising ``cost`` [Q, N] (two empty ones for None)."""
        if cost is None:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty.clone()
        cost = cost.cpu().numpy()
        if not np.isfinite(cost).all():
            raise FloatingPointError(
                "non-finite matching cost (NaN/Inf in pred_masks or pred_class_logits); "
                "check the model outputs / loss scale"
            )
        rows, cols = linear_sum_assignment(cost)
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)

    @torch.no_grad()
    def forward(
        self,
        pred_masks: torch.Tensor,
        targets: Sequence[Dict[str, torch.Tensor]],
        pred_class_logits: Optional[torch.Tensor] = None,
        sampled_targets: Optional[Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match every image of the batch; see the class docstring for shapes (``sampled_targets``:
        :meth:`sample_targets`, shared by several calls on one batch)."""
        costs = self.cost_matrices(pred_masks, targets, pred_class_logits, sampled_targets)
        return [self.assign(cost) for cost in costs]

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
