"""Matching with the referring / region scores (``MODEL.EXTENSIONS.MATCH_WITH_SCORES``, BEYOND THE PAPER).

Official PSALM matches referring, gres and interactive predictions on their masks only (the class term of the
Hungarian cost exists only for category tasks). With this extension the sigmoid scores of the refer / region
heads enter the cost like the class term: ``C[q, n] -= CLASS_WEIGHT * p[q, n]``, with ``p`` the one sentence
score of query q for every target (referring / gres) or region n's score of query q (interactive).
:class:`ExtendedPSALM` builds :class:`ScoreMatchingSetCriterion` (with a :class:`ScoreMatchingHungarianMatcher`)
when the option is on; the losses themselves are the official ones.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..criterion import SetCriterion
from ..matcher import HungarianMatcher

__all__ = ["ScoreMatchingHungarianMatcher", "ScoreMatchingSetCriterion", "match_probs"]


class ScoreMatchingHungarianMatcher(HungarianMatcher):
    """:class:`HungarianMatcher` with an optional per-image score term ``pred_match_probs``."""

    @torch.no_grad()
    def forward(
        self,
        pred_masks: torch.Tensor,
        targets: Sequence[Dict[str, torch.Tensor]],
        pred_class_logits: Optional[torch.Tensor] = None,
        pred_match_probs: Optional[Sequence[torch.Tensor]] = None,
        sampled_targets=None,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """As :meth:`HungarianMatcher.forward`; ``pred_match_probs``: one [Q, N_b] tensor per image, the
        probabilities that query q is target n, added as ``-cost_class * prob`` (None: the official cost)."""
        costs = self.cost_matrices(pred_masks, targets, pred_class_logits, sampled_targets)
        if pred_match_probs is not None:
            if len(pred_match_probs) != len(costs):
                raise ValueError(f"pred_match_probs has {len(pred_match_probs)} entries for {len(costs)} images")
            costs = [c if c is None else self.with_scores(c, p) for c, p in zip(costs, pred_match_probs)]
        return [self.assign(cost) for cost in costs]

    def with_scores(self, cost: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``cost`` [Q, N] (float32) minus ``cost_class * probs`` [Q, N] (in float32)."""
        if probs.shape != cost.shape:
            raise ValueError(f"pred_match_probs must be [Q, N] = {tuple(cost.shape)}, got {tuple(probs.shape)}")
        return cost - self.cost_class * probs.float().to(cost.device)


def match_probs(outputs: Dict, targets: Sequence[Dict], head: str) -> Optional[List[torch.Tensor]]:
    """Per image [Q, N_b] sigmoid scores for the matching cost (referring: the one sentence score for every
    target; region: region j's score for target j); None for category tasks (they keep the class term)."""
    if head == "pred_refer_logits":
        scores = outputs["pred_refer_logits"].detach().sigmoid()[..., 0]  # [B, Q]
        return [scores[b, :, None].expand(-1, t["masks"].shape[0]) for b, t in enumerate(targets)]
    if head == "pred_region_logits":
        return [r.detach().sigmoid().transpose(0, 1) for r in outputs["pred_region_logits"]]  # [Q, R_b]
    return None


class ScoreMatchingSetCriterion(SetCriterion):
    """:class:`SetCriterion` whose matcher also sees the referring / region scores (module docstring)."""

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "matcher": ScoreMatchingHungarianMatcher(cfg)}

    def match(
        self, outputs: Dict, targets: Sequence[Dict], head: str, sampled_targets=None
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        class_logits = outputs.get("pred_class_logits") if head == "pred_class_logits" else None
        return self.matcher(
            outputs["pred_masks"], targets, pred_class_logits=class_logits,
            pred_match_probs=match_probs(outputs, targets, head), sampled_targets=sampled_targets,
        )
