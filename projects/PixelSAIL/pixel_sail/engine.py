"""``PixelSAILTrainer``: psalm's trainer (checkpointing, resumable multi-task sampler, per-task losses,
AMP, clipping, DDP / FSDP) with the Pixel-SAIL mapper and evaluators."""
from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader

from psalm.data.samplers import build_psalm_train_loader
from psalm.engine import PSALMTrainer

from .data import PixelSAILDatasetMapper

__all__ = ["PixelSAILTrainer"]


class PixelSAILTrainer(PSALMTrainer):
    @classmethod
    def build_model(cls, cfg):
        from . import modeling  # noqa: F401  (registers META_ARCH "PixelSAIL")

        if cfg.MODEL.META_ARCHITECTURE != "PixelSAIL":
            raise ValueError(f"PixelSAILTrainer needs MODEL.META_ARCHITECTURE 'PixelSAIL', got {cfg.MODEL.META_ARCHITECTURE!r}")
        return super().build_model(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_psalm_train_loader(cfg, mapper_factory=lambda c, name, task: PixelSAILDatasetMapper(c, True, name, task))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, task=None):
        mapper = PixelSAILDatasetMapper(cfg, is_train=False, dataset_name=dataset_name, task=task)
        return build_detection_test_loader(DatasetCatalog.get(dataset_name), mapper=mapper,
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from psalm.evaluation import build_evaluator

        from .evaluation import VPCategoryEvaluator

        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "interactive":
            return VPCategoryEvaluator(dataset_name, output_dir=output_folder)
        return build_evaluator(cfg, dataset_name, output_folder)
