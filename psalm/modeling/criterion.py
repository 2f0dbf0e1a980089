"""Training losses: one ``SetCriterion`` for every segmentation task, and the LM next-token loss.

For a segmentation batch, the predictor returns mask logits for Q queries plus ONE kind of scores
(the meta-architecture gates the heads per task, as the official code does):

* ``pred_class_logits`` [B, Q, K+1] (panoptic / instance / semantic): cross-entropy over K+1
  classes with weight ``NO_OBJECT_WEIGHT`` (0.1) on the last (background) class; unmatched
  queries get the background target.
* ``pred_refer_logits`` [B, Q, 1] (referring / gres): BCE-with-logits, target 1 at the matched
  queries, ``pos_weight = (B*Q - M) / M``.
* ``pred_region_logits`` list of B [R_b, Q] (interactive): BCE-with-logits over all flattened
  [R_b, Q] scores, target 1 at (region j, query matched to GT j),
  ``pos_weight = (sum_b R_b*Q - M) / M``.

plus, for every task, the point-sampled mask losses ``loss_mask`` (sigmoid BCE averaged over
points) and ``loss_dice`` on the matched (query, GT) pairs, each summed and divided by M. M is the
number of GT masks in the batch, averaged over processes (all-reduce / world size) and clamped to
>= 1; the BCE ``pos_weight`` uses the same M (official behaviour).

Loss names (no per-task prefix; the batch's task is known to the caller): ``loss_ce``,
``loss_mask``, ``loss_dice`` for the last prediction stage, and ``loss_ce_i`` / ``loss_mask_i`` /
``loss_dice_i`` for auxiliary stage ``i`` (0 = first decoder stage), each stage re-matched. The matcher's
uniform points and the GT values there are drawn once per batch and shared by the stages' matchings (each GT
mask is cast and sampled once, not once per stage); the loss points are importance-sampled per stage (they
depend on that stage's predictions). The
returned values are ALREADY WEIGHTED (class 2 / mask 5 / dice 5 by default): the total loss is
``sum(losses.values())``.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from .matcher import HungarianMatcher
from .point_sampling import calculate_uncertainty, get_uncertain_point_coords_with_randomness, point_sample

__all__ = ["SetCriterion", "sigmoid_ce_loss", "dice_loss", "next_token_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100
_LABEL_HEADS = ("pred_class_logits", "pred_refer_logits", "pred_region_logits")


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sigmoid BCE averaged over points, summed over masks, divided by ``num_masks``.

    Args:
        inputs: [M, P] logits. targets: [M, P] in [0, 1].
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum p + sum t + s)`` per mask (``p = sigmoid``), summed / ``num_masks``.

    Args:
        inputs: [M, P] logits. targets: [M, P] in [0, 1].
        smooth: s, in pixel (point) units: 1 is Mask2Former's (and PSALM's); LISA-style code (PixelLM)
            uses 1e-3 (its ``scale=1000, eps=1e-6``).
    """
    probs = inputs.sigmoid()
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1.0 - (numerator + smooth) / (denominator + smooth)).sum() / num_masks


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Causal-LM loss: cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]``.

    Mean over the non-ignored target tokens; a batch whose targets are all ``ignore_index`` gives a
    zero loss (still attached to the graph) instead of NaN.

    Args:
        logits: [B, L, V]. labels: [B, L] long, ``ignore_index`` where no loss is taken.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in [B, L]")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    num_valid = (shift_labels != ignore_index).sum()
    if int(num_valid) == 0:
        return shift_logits.sum() * 0.0
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return loss / num_valid


def _zero(outputs: Dict) -> torch.Tensor:
    """A zero loss attached to the graph of ``pred_masks`` (keeps DDP's used-parameter set stable)."""
    return outputs["pred_masks"].sum() * 0.0


class SetCriterion(nn.Module):
    """Hungarian-matched losses for all segmentation tasks (see the module docstring).

    ``forward(outputs, targets)``:
        outputs: the predictor dict: ``pred_masks`` [B, Q, h, w]; exactly one of
            ``pred_class_logits`` [B, Q, K+1], ``pred_refer_logits`` [B, Q, 1],
            ``pred_region_logits`` list of B [R_b, Q] (the others absent or None);
            ``aux_outputs``: list of dicts with the same keys (one per earlier stage).
        targets: list of B dicts: ``masks`` [N_b, S, S] bool/float at the padded input size,
            ``labels`` long [N_b] (class ids in [0, K) for category tasks; any value otherwise).
            For interactive, R_b must equal N_b (region j <-> GT j).
    Returns:
        dict of WEIGHTED scalar losses (see the module docstring for names).
    """

    @configurable
    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 112 * 112,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
    ):
        super().__init__()
        self.matcher = matcher
        self.weight_dict = {"loss_ce": float(class_weight), "loss_mask": float(mask_weight),
                            "loss_dice": float(dice_weight)}
        self.no_object_weight = float(no_object_weight)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.deep_supervision = bool(deep_supervision)

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        return {
            "matcher": HungarianMatcher(cfg),
            "class_weight": mf.CLASS_WEIGHT,
            "mask_weight": mf.MASK_WEIGHT,
            "dice_weight": mf.DICE_WEIGHT,
            "no_object_weight": mf.NO_OBJECT_WEIGHT,
            "num_points": mf.TRAIN_NUM_POINTS,
            "oversample_ratio": mf.OVERSAMPLE_RATIO,
            "importance_sample_ratio": mf.IMPORTANCE_SAMPLE_RATIO,
            "deep_supervision": mf.DEEP_SUPERVISION,
        }

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def label_head(outputs: Dict) -> str:
        """The one non-None label head of ``outputs`` (error if none or several)."""
        present = [k for k in _LABEL_HEADS if outputs.get(k) is not None]
        if len(present) != 1:
            raise ValueError(
                f"SetCriterion needs exactly one of {_LABEL_HEADS} to be set (one task per batch); "
                f"got {present or 'none'}. The meta-architecture must pass None for the heads of "
                "other tasks."
            )
        return present[0]

    def num_masks(self, targets: Sequence[Dict], device: torch.device) -> float:
        """GT masks in the batch, averaged over processes, clamped to >= 1."""
        num = torch.as_tensor([float(sum(len(t["masks"]) for t in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            world_size = dist.get_world_size()
        return max(num.item() / world_size, 1.0)

    def sample_points(self, src_masks: torch.Tensor) -> torch.Tensor:
        """[M, P, 2] importance-sampled points for [M, 1, h, w] mask logits (override in tests)."""
        return get_uncertain_point_coords_with_randomness(
            src_masks, calculate_uncertainty, self.num_points, self.oversample_ratio,
            self.importance_sample_ratio,
        )

    # ------------------------------------------------------------------ losses
    def loss_class(self, outputs, targets, indices, num_masks) -> torch.Tensor:
        logits = outputs["pred_class_logits"].float()  # [B, Q, K+1]
        num_classes = logits.shape[-1]
        target_classes = torch.full(logits.shape[:2], num_classes - 1, dtype=torch.int64,
                                    device=logits.device)
        for b, (src, tgt) in enumerate(indices):
            if len(src):
                labels = targets[b]["labels"].to(logits.device)[tgt]
                if labels.min() < 0 or labels.max() >= num_classes - 1:
                    raise ValueError(
                        f"category labels must lie in [0, {num_classes - 1}) (the last class is "
                        f"background); got [{int(labels.min())}, {int(labels.max())}]"
                    )
                target_classes[b, src.to(logits.device)] = labels
        weight = torch.ones(num_classes, device=logits.device)
        weight[-1] = self.no_object_weight
        return F.cross_entropy(logits.transpose(1, 2), target_classes, weight=weight)

    @staticmethod
    def _pos_weighted_bce(logits: torch.Tensor, target: torch.Tensor, num_masks: float) -> torch.Tensor:
        # official: pos_weight = (number of scores - M) / M; clamped at 0 so that a batch with more
        # GT masks than scores cannot produce a negative loss
        pos_weight = max((logits.numel() - num_masks) / num_masks, 0.0)
        return F.binary_cross_entropy_with_logits(
            logits, target, pos_weight=torch.tensor(pos_weight, device=logits.device, dtype=logits.dtype)
        )

    def loss_refer(self, outputs, targets, indices, num_masks) -> torch.Tensor:
        logits = outputs["pred_refer_logits"].float()  # [B, Q, 1]
        if logits.dim() != 3 or logits.shape[-1] != 1:
            raise ValueError(f"pred_refer_logits must be [B, Q, 1], got {tuple(logits.shape)}")
        target = torch.zeros_like(logits)
        for b, (src, _) in enumerate(indices):
            target[b, src.to(logits.device), 0] = 1.0
        return self._pos_weighted_bce(logits, target, num_masks)

    def loss_region(self, outputs, targets, indices, num_masks) -> torch.Tensor:
        region_logits = outputs["pred_region_logits"]
        if len(region_logits) != len(targets):
            raise ValueError(f"pred_region_logits has {len(region_logits)} entries for {len(targets)} images")
        flat_logits, flat_targets = [], []
        for b, (logits, (src, tgt)) in enumerate(zip(region_logits, indices)):
            if logits.shape[0] != len(targets[b]["masks"]):
                raise ValueError(
                    f"image {b}: {logits.shape[0]} regions but {len(targets[b]['masks'])} GT masks; "
                    "interactive targets must hold one GT mask per region (region j <-> GT j)"
                )
            logits = logits.float()
            target = torch.zeros_like(logits)  # [R_b, Q]
            target[tgt.to(logits.device), src.to(logits.device)] = 1.0
            flat_logits.append(logits.flatten())
            flat_targets.append(target.flatten())
        logits, target = torch.cat(flat_logits), torch.cat(flat_targets)
        if logits.numel() == 0:
            return _zero(outputs)
        return self._pos_weighted_bce(logits, target, num_masks)

    def loss_masks(self, outputs, targets, indices, num_masks) -> Tuple[torch.Tensor, torch.Tensor]:
        pred_masks = outputs["pred_masks"]  # [B, Q, h, w]
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        if src_idx.numel() == 0:
            zero = _zero(outputs)
            return zero, zero.clone()
        src_masks = pred_masks[batch_idx.to(pred_masks.device), src_idx.to(pred_masks.device)]
        sizes = {tuple(t["masks"].shape[-2:]) for t, (src, _) in zip(targets, indices) if len(src)}
        if len(sizes) != 1:
            raise ValueError(f"all target masks of a batch must share one (padded) size, got {sorted(sizes)}")
        target_masks = torch.cat([
            t["masks"][tgt.to(t["masks"].device)].to(pred_masks.device)
            for t, (_, tgt) in zip(targets, indices) if len(tgt)
        ])
        src_masks = src_masks[:, None].float()  # [M, 1, h, w]
        target_masks = target_masks[:, None].float()  # [M, 1, S, S]
        with torch.no_grad():
            point_coords = self.sample_points(src_masks)
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return (sigmoid_ce_loss(point_logits, point_labels, num_masks),
                dice_loss(point_logits, point_labels, num_masks))

    # ------------------------------------------------------------------ forward
    def match(
        self, outputs: Dict, targets: Sequence[Dict], head: str, sampled_targets=None
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Hungarian indices of one stage: mask cost, plus the class term for category tasks (official);
        ``sampled_targets``: the matcher's ``sample_targets`` of this batch (shared by the stages)."""
        class_logits = outputs.get("pred_class_logits") if head == "pred_class_logits" else None
        return self.matcher(
            outputs["pred_masks"], targets, pred_class_logits=class_logits, sampled_targets=sampled_targets
        )

    def _stage_losses(
        self, outputs: Dict, targets: Sequence[Dict], head: str, num_masks: float, sampled_targets=None
    ) -> Dict:
        indices = self.match(outputs, targets, head, sampled_targets)
        if head == "pred_class_logits":
            loss_ce = self.loss_class(outputs, targets, indices, num_masks)
        elif head == "pred_refer_logits":
            loss_ce = self.loss_refer(outputs, targets, indices, num_masks)
        else:
            loss_ce = self.loss_region(outputs, targets, indices, num_masks)
        loss_mask, loss_dice = self.loss_masks(outputs, targets, indices, num_masks)
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}

    def forward(self, outputs: Dict, targets: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        head = self.label_head(outputs)
        if len(targets) != outputs["pred_masks"].shape[0]:
            raise ValueError(f"{len(targets)} target dicts for a batch of {outputs['pred_masks'].shape[0]}")
        device = outputs["pred_masks"].device
        num_masks = self.num_masks(targets, device)
        # once per batch, not once per stage: the GT masks as float on the device, and the matcher's
        # uniform points with the GT values there (shared by every stage's matching)
        targets = [{**t, "masks": t["masks"].to(device).float()} for t in targets]
        sampled_targets = self.matcher.sample_targets(targets, device)
        stages: List[Tuple[str, Dict]] = [("", outputs)]
        if self.deep_supervision:
            stages += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs") or [])]
        losses = {}
        for suffix, stage_outputs in stages:
            if stage_outputs.get(head) is None:
                raise ValueError(f"auxiliary outputs{suffix} lack {head!r}, which the final outputs have")
            for name, value in self._stage_losses(stage_outputs, targets, head, num_masks, sampled_targets).items():
                losses[name + suffix] = value * self.weight_dict[name]
        return losses

    def extra_repr(self) -> str:
        return (
            f"weight_dict={self.weight_dict}, no_object_weight={self.no_object_weight}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"deep_supervision={self.deep_supervision}"
        )
