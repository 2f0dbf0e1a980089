"""``build_evaluator(cfg, dataset_name, output_dir)``: the evaluator(s) for a registered data set.

Chosen by ``MetadataCatalog.get(dataset_name).evaluator_type``:

| evaluator_type | evaluators |
|---|---|
| ``coco_panoptic_seg``, ``ade20k_panoptic_seg`` | ``COCOPanopticEvaluator`` (PQ) + :class:`PanopticThingAPEvaluator` (thing mask AP: ``COCOEvaluator`` on the instance json ``json_file``, required) + ``SemSegEvaluator`` (mIoU, skipped with a warning without ``sem_seg_root``), per ``MODEL.MASK_FORMER.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON`` |
| ``coco`` | ``COCOEvaluator(tasks=("segm",), use_fast_impl=False)`` (mask AP; degenerate GT polygons dropped: :class:`ValidPolygonCOCOEvaluator`) |
| ``sem_seg`` | ``SemSegEvaluator`` (mIoU) |
| ``referring`` / ``gres`` | :class:`ReferringEvaluator` / :class:`GRESEvaluator` |
| ``interactive`` | :class:`InteractiveEvaluator` |
| ``davis`` | :class:`DAVISEvaluator` |
| ``lvis`` | detectron2 ``LVISEvaluator`` (needs the ``lvis`` package) |
"""
from __future__ import annotations

import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from .coco_json import ValidPolygonCOCOEvaluator
from .davis import DAVISEvaluator
from .interactive import InteractiveEvaluator
from .panoptic_ap import PanopticThingAPEvaluator
from .referring import GRESEvaluator, ReferringEvaluator

logger = logging.getLogger(__name__)

EVALUATOR_TYPES = (
    "coco_panoptic_seg", "ade20k_panoptic_seg", "coco", "sem_seg", "referring", "gres", "interactive", "davis", "lvis",
)


def _test_flag(cfg, key: str, default: bool = True) -> bool:
    try:
        return bool(getattr(cfg.MODEL.MASK_FORMER.TEST, key))
    except AttributeError:
        return default


def _rasterizer(cfg) -> str:
    try:
        return cfg.TEST.PSALM.GT_POLYGON_RASTERIZER
    except AttributeError:
        return "coco"


def build_evaluator(cfg, dataset_name: str, output_dir: str | None = None, distributed: bool = True):
    """The detectron2 ``DatasetEvaluator`` for ``dataset_name`` (a ``DatasetEvaluators`` when several)."""
    if output_dir is None and cfg is not None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    et = meta.get("evaluator_type", None)
    if et is None:
        raise ValueError(
            f"data set '{dataset_name}' has no metadata 'evaluator_type'; is it registered "
            "(import psalm.data.datasets) and spelled right?"
        )
    evaluators = []
    if et in ("coco_panoptic_seg", "ade20k_panoptic_seg"):
        if _test_flag(cfg, "PANOPTIC_ON"):
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_dir))
        if _test_flag(cfg, "INSTANCE_ON"):
            # thing ids of a panoptic set live in the K-class space (ADE: not 0..T-1): evaluated on a
            # view; a missing instance json is a MissingDatasetFileError naming INSTANCE_ON
            evaluators.append(PanopticThingAPEvaluator(dataset_name, distributed, output_dir))
        else:
            logger.warning("'%s': thing mask AP skipped (MODEL.MASK_FORMER.TEST.INSTANCE_ON is False)", dataset_name)
        if _test_flag(cfg, "SEMANTIC_ON"):
            if os.path.isdir(meta.get("sem_seg_root", "")):
                evaluators.append(SemSegEvaluator(dataset_name, distributed=distributed, output_dir=output_dir))
            else:
                logger.warning(
                    "'%s': semantic mIoU skipped, %r does not exist (python datasets/prepare_coco_semantic_from_panoptic.py)",
                    dataset_name, meta.get("sem_seg_root"),
                )
    elif et == "coco":
        evaluators.append(
            ValidPolygonCOCOEvaluator(dataset_name, tasks=("segm",), distributed=distributed, output_dir=output_dir,
                                      use_fast_impl=False)
        )
    elif et == "sem_seg":
        evaluators.append(SemSegEvaluator(dataset_name, distributed=distributed, output_dir=output_dir))
    elif et == "referring":
        evaluators.append(ReferringEvaluator(dataset_name, distributed, output_dir, rasterizer=_rasterizer(cfg)))
    elif et == "gres":
        evaluators.append(GRESEvaluator(dataset_name, distributed, output_dir, rasterizer=_rasterizer(cfg),
                                        no_target_mode=cfg.TEST.PSALM.GREF_NO_TARGET if cfg is not None else None))
    elif et == "interactive":
        evaluators.append(InteractiveEvaluator(dataset_name, distributed, output_dir, rasterizer=_rasterizer(cfg)))
    elif et == "davis":
        evaluators.append(DAVISEvaluator(dataset_name, distributed, output_dir))
    elif et == "lvis":
        from .lvis_compat import patch_lvis_numpy_aliases

        try:
            patch_lvis_numpy_aliases()  # lvis 0.5.3 calls np.float, gone since numpy 1.24
        except ImportError as e:
            raise ImportError(f"'{dataset_name}' is evaluated with detectron2's LVISEvaluator: {e}") from e
        from detectron2.evaluation import LVISEvaluator

        evaluators.append(LVISEvaluator(dataset_name, tasks=("segm",), distributed=distributed, output_dir=output_dir))
    else:
        raise ValueError(
            f"no evaluator for data set '{dataset_name}' (evaluator_type={et!r}); known types: {EVALUATOR_TYPES}"
        )
    if not evaluators:
        raise ValueError(f"every evaluator of '{dataset_name}' is switched off (MODEL.MASK_FORMER.TEST.*_ON)")
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
