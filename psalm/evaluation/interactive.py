"""COCO-Interactive metrics: mIoU and cIoU per prompt type (paper Table 10).

Every region (one visual prompt -> one target object) is one sample: I = |P & G|, U = |P | G| at
original resolution, IoU = I / U with an empty union counting as 1.0 (official). ``mIoU`` = mean
IoU over all regions (the paper's "mIoU" is this per-object mean, the official gIoU), ``cIoU`` =
sum(I) / sum(U). The prompt type comes from the data set's metadata ``prompt_type``
(``coco_interactive_val_point`` ...), so results are reported as ``mIoU_point`` / ``cIoU_point``
as well as plain ``mIoU`` / ``cIoU``.

Output: ``instances.pred_masks`` [R, H, W]; region j is annotation ``region_ann_indices[j]`` of
the dataset dict when the input has that key, else annotation j.
"""
from __future__ import annotations

import numpy as np

from .base import SampleGTEvaluator
from .masks import annotation_to_mask, intersection_union, iou_from_counts, pred_masks_to_numpy


class InteractiveEvaluator(SampleGTEvaluator):
    task_key = "interactive"

    def __init__(self, dataset_name, distributed=True, output_dir=None, rasterizer="coco"):
        super().__init__(dataset_name, distributed, output_dir)
        self.rasterizer = rasterizer
        self.prompt_type = self.metadata.get("prompt_type", "any")

    def _process_one(self, record, inp, out):
        hw = (record["height"], record["width"])
        what = f"{self.dataset_name} sample {record.get('sample_id')}"
        if "instances" not in out:
            raise KeyError(f"{what}: model output has no 'instances' (expected one mask per region)")
        preds = pred_masks_to_numpy(out["instances"].pred_masks, hw, what)
        anns = record["annotations"]
        indices = inp.get("region_ann_indices")
        indices = list(range(len(anns))) if indices is None else [int(i) for i in indices]
        if len(preds) != len(indices):
            raise ValueError(f"{what}: {len(preds)} predicted masks for {len(indices)} regions")
        per_region = []
        for pred, j in zip(preds, indices):
            gt = annotation_to_mask(anns[j]["segmentation"], *hw, rasterizer=self.rasterizer)
            inter, union = intersection_union(pred, gt)
            per_region.append({"I": inter, "U": union, "iou": iou_from_counts(inter, union)})
        return per_region

    def _summarize(self, stats):
        regions = [r for per_sample in stats.values() for r in per_sample]
        if not regions:
            return {"num_regions": 0}
        miou = 100.0 * float(np.mean([r["iou"] for r in regions]))
        ciou = 100.0 * sum(r["I"] for r in regions) / max(sum(r["U"] for r in regions), 1)
        res = {"mIoU": miou, "cIoU": ciou}
        if self.prompt_type != "any":
            res[f"mIoU_{self.prompt_type}"] = miou
            res[f"cIoU_{self.prompt_type}"] = ciou
        res.update(num_regions=len(regions), num_images=len(stats))
        return res
