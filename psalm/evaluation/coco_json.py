"""detectron2's ``COCOEvaluator`` on ground truth with degenerate polygons (real COCO files have them).

pycocotools reads a 4-value "polygon" as a box (or fails on it, depending on the version) and a
polygon with fewer than 3 points covers nothing. :class:`ValidPolygonCOCOEvaluator` is
``COCOEvaluator`` whose ground-truth API drops those polygons, and annotations left without one, as
detectron2's ``load_coco_json`` does for training, with a logged count; the json file itself is
not modified. Ground truth without such polygons is used unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging

from detectron2.evaluation import COCOEvaluator
from pycocotools.coco import COCO

from psalm.data.visual_prompts import valid_polygons

logger = logging.getLogger(__name__)

__all__ = ["ValidPolygonCOCOEvaluator", "drop_degenerate_polygons"]


def drop_degenerate_polygons(data: dict) -> int:
    """In place on a COCO instance dict: keep each annotation's valid polygons (>= 3 points, even
    length), drop annotations left without one. Returns how many annotations were dropped."""
    kept, dropped = [], 0
    for ann in data.get("annotations", []):
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            good = valid_polygons(seg)
            if not good:
                dropped += 1
                continue
            if len(good) != len(seg):
                ann = dict(ann, segmentation=good)
        kept.append(ann)
    data["annotations"] = kept
    return dropped


class ValidPolygonCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` (same arguments) whose ground truth has no degenerate polygon."""

    def __init__(self, dataset_name, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        data = self._coco_api.dataset
        segs = (a.get("segmentation") for a in data.get("annotations", []))
        if all(not isinstance(s, list) or len(valid_polygons(s)) == len(s) for s in segs):
            return
        data = copy.deepcopy(data)
        n = drop_degenerate_polygons(data)
        api = COCO()
        api.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            api.createIndex()
        self._coco_api = api
        logger.warning(
            "'%s': ground truth with degenerate polygons (< 3 points or odd length): those polygons are ignored, "
            "%d annotation(s) left without one are dropped (detectron2's load_coco_json rule)", dataset_name, n,
        )
