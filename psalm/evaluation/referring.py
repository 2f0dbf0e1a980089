"""Referring (RefCOCO/+/g) and generalized referring (gRefCOCO) segmentation metrics.

Per sample (prediction P = union of ``instances.pred_masks``, ground truth G = union of the
referred objects, both at original resolution): I = |P & G|, U = |P | G|, IoU = I / U with an
empty union counting as 1.0 (official convention).

* ``cIoU`` = sum(I) / sum(U) over the data set; ``gIoU`` = mean per-sample IoU;
* ``Pr@t`` (t = 0.5 ... 0.9) = share of samples with IoU >= t (gRefCOCO: over samples with a
  target, as GRES / ReLA).

gRefCOCO additionally (GRES / ReLA rules; "no target" is the positive class): a prediction is
"no target" when the output has ``no_target=True`` or its mask is empty, and is then scored as an
empty mask. No-target sample: predicted no-target -> TP (IoU 1, adds nothing to I / U); else FN
(IoU 0, U += |P|). Sample with a target: predicted no-target -> FP (I = 0, U = |G|); else TN.
``N-acc`` = TP / (TP + FN), ``T-acc`` = TN / (TN + FP). All numbers are percentages.

With ``TEST.PSALM.GREF_NO_TARGET: "top1"`` (official) the model always returns its top-1 mask, so
it never predicts "no target" (only a top-1 mask that happens to be empty would count): N-acc is 0
by construction, not a measurement. The evaluator then adds ``N-acc_by_construction = 1.0`` next
to ``N-acc`` in the results (:data:`NACC_TOP1_KEY`; results stay numeric for detectron2's EvalHook)
and says so in the log; use ``"empty"`` to measure N-acc.
"""
from __future__ import annotations

import numpy as np

from .base import SampleGTEvaluator
from .masks import intersection_union, iou_from_counts, pred_masks_to_numpy, union_mask

PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
# 1.0 in the results when N-acc is 0 by construction (GREF_NO_TARGET=top1 never predicts no-target)
NACC_TOP1_KEY = "N-acc_by_construction"


def _prediction_union(out: dict, hw, what: str) -> np.ndarray:
    if "instances" not in out:
        raise KeyError(f"{what}: model output has no 'instances' (expected pred_masks [1, H, W])")
    masks = pred_masks_to_numpy(out["instances"].pred_masks, hw, what)
    return masks.any(axis=0) if len(masks) else np.zeros(hw, dtype=bool)


class ReferringEvaluator(SampleGTEvaluator):
    """cIoU, gIoU and Pr@0.5..0.9 for ``referring`` data sets (one sentence or merged sentences)."""

    task_key = "referring"

    def __init__(self, dataset_name, distributed=True, output_dir=None, rasterizer="coco",
                 pr_thresholds=PR_THRESHOLDS):
        super().__init__(dataset_name, distributed, output_dir)
        self.rasterizer = rasterizer
        self.pr_thresholds = tuple(pr_thresholds)

    def _process_one(self, record, inp, out):
        hw = (record["height"], record["width"])
        gt = union_mask(record["annotations"], *hw, rasterizer=self.rasterizer)
        pred = _prediction_union(out, hw, f"{self.dataset_name} sample {record.get('sample_id')}")
        inter, union = intersection_union(pred, gt)
        return {"I": inter, "U": union, "iou": iou_from_counts(inter, union)}

    def _summarize(self, stats):
        vals = list(stats.values())
        res = {
            "cIoU": 100.0 * sum(v["I"] for v in vals) / max(sum(v["U"] for v in vals), 1),
            "gIoU": 100.0 * float(np.mean([v["iou"] for v in vals])),
        }
        for t in self.pr_thresholds:
            res[f"Pr@{t:.1f}"] = 100.0 * float(np.mean([v["iou"] >= t for v in vals]))
        res["num_samples"] = len(vals)
        return res


class GRESEvaluator(ReferringEvaluator):
    """gRefCOCO: cIoU, gIoU, N-acc, T-acc (GRES / ReLA rules) and Pr@t over samples with a target."""

    task_key = "gres"

    def __init__(self, dataset_name, distributed=True, output_dir=None, rasterizer="coco",
                 pr_thresholds=PR_THRESHOLDS, no_target_mode=None):
        """``no_target_mode``: the post-processing's ``TEST.PSALM.GREF_NO_TARGET`` ("top1" / "empty");
        with "top1" the results flag N-acc as 0 by construction (:data:`NACC_TOP1_KEY` = 1.0)."""
        super().__init__(dataset_name, distributed, output_dir, rasterizer, pr_thresholds)
        self.no_target_mode = no_target_mode

    def _process_one(self, record, inp, out):
        hw = (record["height"], record["width"])
        gt = union_mask(record["annotations"], *hw, rasterizer=self.rasterizer)
        pred = _prediction_union(out, hw, f"{self.dataset_name} sample {record.get('sample_id')}")
        pred_nt = bool(out.get("no_target", False)) or not pred.any()
        if pred_nt:
            pred = np.zeros(hw, dtype=bool)
        gt_nt = bool(record.get("no_target", not gt.any()))
        inter, union = intersection_union(pred, gt)
        if gt_nt:
            outcome = "TP" if pred_nt else "FN"
            iou = 1.0 if pred_nt else 0.0
        else:
            outcome = "FP" if pred_nt else "TN"
            iou = 0.0 if union == 0 else inter / union
        return {"I": inter, "U": union, "iou": iou, "gt_nt": gt_nt, "outcome": outcome}

    def _summarize(self, stats):
        vals = list(stats.values())
        count = {k: sum(v["outcome"] == k for v in vals) for k in ("TP", "FN", "FP", "TN")}
        targets = [v for v in vals if not v["gt_nt"]]
        res = {
            "cIoU": 100.0 * sum(v["I"] for v in vals) / max(sum(v["U"] for v in vals), 1),
            "gIoU": 100.0 * float(np.mean([v["iou"] for v in vals])),
            "N-acc": 100.0 * count["TP"] / (count["TP"] + count["FN"]) if count["TP"] + count["FN"] else float("nan"),
            "T-acc": 100.0 * count["TN"] / (count["TN"] + count["FP"]) if count["TN"] + count["FP"] else float("nan"),
        }
        for t in self.pr_thresholds:
            res[f"Pr@{t:.1f}"] = 100.0 * float(np.mean([v["iou"] >= t for v in targets])) if targets else float("nan")
        res.update(num_samples=len(vals), num_no_target=count["TP"] + count["FN"])
        if self.no_target_mode == "top1":
            self._logger.warning(
                "[GRESEvaluator] %s: N-acc = %.2f is 0 by construction: TEST.PSALM.GREF_NO_TARGET='top1' (official) "
                "always returns the top-1 mask and never predicts 'no target'; set 'empty' to measure N-acc "
                "(results: %s = 1.0)", self.dataset_name, res["N-acc"], NACC_TOP1_KEY,
            )
            items = list(res.items())
            i = [k for k, _ in items].index("N-acc") + 1
            res = dict(items[:i] + [(NACC_TOP1_KEY, 1.0)] + items[i:])
        return res
