"""``PixelSAILTrainer``: psalm's trainer (checkpointing, resumable multi-task sampler, per-task losses,
AMP, clipping, DDP / FSDP) with the Pixel-SAIL mapper and evaluators."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from psalm.data.samplers import build_psalm_train_loader
from psalm.engine import PSALMTrainer

from .data import PixelSAILDatasetMapper, check_pixel_sail_task

__all__ = ["PixelSAILTrainer"]

logger = logging.getLogger(__name__)


class PixelSAILTrainer(PSALMTrainer):
    @classmethod
    def build_model(cls, cfg):
        from . import modeling  # noqa: F401  (registers META_ARCH "PixelSAIL")

        if cfg.MODEL.META_ARCHITECTURE != "PixelSAIL":
            raise ValueError(f"PixelSAILTrainer needs MODEL.META_ARCHITECTURE 'PixelSAIL', got {cfg.MODEL.META_ARCHITECTURE!r}")
        return super().build_model(cfg)

    @classmethod
    def prebuilt_weight_sources(cls, cfg) -> dict:
        """psalm's strict initial-weights plan (``MODEL.PSALM.INIT.*`` + ``MODEL.WEIGHTS``: every key from
        exactly one source), with the LLM's source being how it was built: ``MODEL.PIXEL_SAIL.LLM.INIT``
        "pretrained" (loaded from NAME_OR_PATH), "random" (declared from scratch) or "checkpoint" (no source
        here: MODEL.WEIGHTS / MODEL.PSALM.INIT.WEIGHTS must cover ``llm.*``). psalm's own rule reads
        ``MODEL.PSALM.LLM``, which this project does not use."""
        llm = cfg.MODEL.PIXEL_SAIL.LLM
        if llm.INIT == "checkpoint":
            return {}
        if llm.INIT == "pretrained":
            return {"llm.": f"MODEL.PIXEL_SAIL.LLM.NAME_OR_PATH ({llm.NAME_OR_PATH})"}
        return {"llm.": "random initialisation (MODEL.PIXEL_SAIL.LLM.INIT 'random')"}

    @classmethod
    def build_train_loader(cls, cfg):
        """psalm's multi-task loader with the Pixel-SAIL mapper; the tasks (``DATASETS.TRAIN_TASKS`` or the data
        sets' metadata) are the mapper's ``TASKS`` (psalm's plus ``muse``)."""
        return build_psalm_train_loader(cfg, mapper_factory=lambda c, name, task: PixelSAILDatasetMapper(c, True, name, task),
                                        task_check=check_pixel_sail_task)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, task=None):
        """Batches of ``TEST.PSALM.IMS_PER_BATCH`` mapped dicts (Pixel-SAIL mapper), each process its shard."""
        from detectron2.data.common import DatasetFromList, MapDataset
        from detectron2.data.samplers import InferenceSampler

        dicts = DatasetCatalog.get(dataset_name)
        if not dicts:
            raise ValueError(f"data set {dataset_name!r} is empty")
        mapper = PixelSAILDatasetMapper(cfg, is_train=False, dataset_name=dataset_name, task=task)
        dataset = MapDataset(DatasetFromList(dicts, copy=False), mapper)
        sampler = torch.utils.data.BatchSampler(InferenceSampler(len(dataset)), int(cfg.TEST.PSALM.IMS_PER_BATCH), False)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.DATALOADER.NUM_WORKERS,
                                           collate_fn=lambda batch: batch)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on every ``DATASETS.TEST`` entry (task ``DATASETS.TEST_TASKS``) with the Pixel-SAIL
        mapper and evaluators, in ``TEST.PSALM.DTYPE`` precision. psalm's ``evaluate_datasets`` builds
        psalm's own mapper and has no mapper hook, hence this loop."""
        from detectron2.evaluation import inference_on_dataset, print_csv_format
        from detectron2.utils import comm

        from psalm.engine.distributed import full_params_for_inference
        from psalm.engine.evaluation import inference_dtype
        from psalm.predictor import autocast_context

        names, tasks = list(cfg.DATASETS.TEST), list(cfg.DATASETS.TEST_TASKS)
        if tasks and len(tasks) != len(names):
            raise ValueError(f"DATASETS.TEST_TASKS has {len(tasks)} entries for {len(names)} DATASETS.TEST data sets")
        if evaluators is not None and len(evaluators) != len(names):
            raise ValueError(f"{len(evaluators)} evaluators for {len(names)} DATASETS.TEST data sets")
        results = OrderedDict()
        dtype = inference_dtype(cfg, model)
        device = next(model.parameters()).device
        for i, name in enumerate(names):
            loader = cls.build_test_loader(cfg, name, tasks[i] if tasks else None)
            evaluator = evaluators[i] if evaluators is not None else cls.build_evaluator(cfg, name)
            with full_params_for_inference(model, cfg.SOLVER.FSDP.RESHARD_AFTER_FORWARD), autocast_context(device, dtype):
                results[name] = inference_on_dataset(model, loader, evaluator)
            if comm.is_main_process():
                logger.info("Evaluation results for %s in csv format:", name)
                print_csv_format(results[name])
        if len(results) == 1:
            return list(results.values())[0]
        return results

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from psalm.evaluation import build_evaluator

        from .evaluation import VPCategoryEvaluator

        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "interactive":
            return VPCategoryEvaluator(dataset_name, output_dir=output_folder)
        return build_evaluator(cfg, dataset_name, output_folder)
