"""Evaluators: referring / gRefCOCO / interactive / DAVIS / panoptic thing AP (ours) and detectron2's PQ / AP / mIoU.

Use :func:`build_evaluator` (picks by the data set's ``evaluator_type``).
"""
from .build import EVALUATOR_TYPES, build_evaluator
from .davis import DAVISEvaluator, boundary_f_measure, mean_recall_decay, region_similarity
from .interactive import InteractiveEvaluator
from .masks import annotation_to_mask, union_mask
from .panoptic_ap import PanopticThingAPEvaluator
from .referring import GRESEvaluator, ReferringEvaluator

__all__ = [
    "EVALUATOR_TYPES",
    "build_evaluator",
    "ReferringEvaluator",
    "GRESEvaluator",
    "InteractiveEvaluator",
    "PanopticThingAPEvaluator",
    "DAVISEvaluator",
    "region_similarity",
    "boundary_f_measure",
    "mean_recall_decay",
    "annotation_to_mask",
    "union_mask",
]
