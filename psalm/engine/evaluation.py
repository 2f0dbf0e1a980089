"""One evaluation path, whichever tool runs it.

``tools/train_net.py`` (``--eval-only`` and the periodic / final evaluation of a training run, through
:meth:`psalm.engine.PSALMTrainer.test`) and ``tools/eval_zero_shot.py`` both evaluate a data set with
:func:`evaluate_dataset`, so one checkpoint gives the same metrics in both:

* the test loader (:func:`build_test_loader`): :class:`psalm.data.mapper.PSALMDatasetMapper` (the task
  from the caller, else the data set's metadata), ``TEST.PSALM.IMS_PER_BATCH`` images per batch, each
  process its shard (detectron2's ``InferenceSampler``);
* the precision: ``TEST.PSALM.DTYPE`` (``psalm.predictor.resolve_inference_dtype``: "auto" = bf16 autocast
  on CUDA, fp32 on CPU), as the predictor;
* the evaluator: ``psalm.evaluation.build_evaluator`` (by the data set's ``evaluator_type``); DAVIS
  (``evaluator_type`` "davis") propagates masks through each video (:mod:`psalm.inference.video`);
* the weights: :func:`load_weights_for_evaluation`: an empty ``MODEL.WEIGHTS`` or a checkpoint that
  leaves model tensors missing is an error unless explicitly allowed (``--allow-missing-keys`` in both
  tools).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from tqdm import tqdm

from .distributed import full_params_for_inference, unwrap_model

__all__ = [
    "build_test_loader",
    "inference_dtype",
    "evaluate_dataset",
    "evaluate_datasets",
    "load_weights_for_evaluation",
    "ALLOW_MISSING_FLAG",
    "write_results",
]

logger = logging.getLogger(__name__)

ALLOW_MISSING_FLAG = "--allow-missing-keys"


def write_results(cfg, results) -> Optional[str]:
    """Write ``results`` (the evaluators' nested dict) to ``OUTPUT_DIR/results.json`` on the main process,
    atomically; returns the path (``None`` on other ranks or without results). Every ``train_net`` uses it."""
    if not results or not comm.is_main_process():
        return None
    import json

    from .checkpoint import atomic_write_text

    path = os.path.join(cfg.OUTPUT_DIR, "results.json")
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True))
    logger.info("Evaluation results written to %s", path)
    return path


def _trivial_batch_collator(batch):
    return batch


def build_test_loader(cfg, dataset_name: str, task: Optional[str] = None, batch_size: Optional[int] = None):
    """Test loader of ``dataset_name``: lists of ``batch_size`` (default ``TEST.PSALM.IMS_PER_BATCH``) mapped
    dicts, in data-set order, each process its contiguous shard."""
    from detectron2.data.common import DatasetFromList, MapDataset
    from detectron2.data.samplers import InferenceSampler

    from psalm.data.mapper import PSALMDatasetMapper

    batch_size = int(cfg.TEST.PSALM.IMS_PER_BATCH if batch_size is None else batch_size)
    if batch_size < 1:
        raise ValueError(f"TEST.PSALM.IMS_PER_BATCH must be >= 1, got {batch_size}")
    dicts = DatasetCatalog.get(dataset_name)
    if not dicts:
        raise ValueError(f"data set {dataset_name!r} is empty")
    mapper = PSALMDatasetMapper(cfg, is_train=False, dataset_name=dataset_name, task=task)
    dataset = MapDataset(DatasetFromList(dicts, copy=False), mapper)
    batch_sampler = torch.utils.data.BatchSampler(InferenceSampler(len(dataset)), batch_size, drop_last=False)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=_trivial_batch_collator,
    )


class _ProgressLoader:
    """A data loader wrapped in tqdm (``inference_on_dataset`` needs ``len``)."""

    def __init__(self, loader, desc: str):
        self.loader, self.desc = loader, desc

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        yield from tqdm(self.loader, total=len(self.loader), desc=self.desc, disable=not comm.is_main_process())


def _model_device(model) -> torch.device:
    bare = unwrap_model(model)
    device = getattr(bare, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(bare.parameters()).device


def inference_dtype(cfg, model) -> Optional[torch.dtype]:
    """The autocast dtype of ``TEST.PSALM.DTYPE`` on the model's device (None: fp32)."""
    from psalm.predictor import resolve_inference_dtype

    return resolve_inference_dtype(cfg.TEST.PSALM.DTYPE, _model_device(model))


def evaluate_dataset(cfg, model, dataset_name: str, task: Optional[str] = None, evaluator=None,
                     output_dir: Optional[str] = None):
    """Evaluate ``model`` (eval mode is set and restored by detectron2) on ``dataset_name``.

    Args:
        task: the model task for every sample (None: the data set's metadata ``task``).
        evaluator: default ``psalm.evaluation.build_evaluator(cfg, dataset_name, output_dir)``.
        output_dir: evaluator files (default ``<OUTPUT_DIR>/inference/<dataset_name>``).
    Returns:
        the evaluator's results (``{}`` on non-main ranks for most evaluators).
    """
    from psalm.evaluation import build_evaluator
    from psalm.predictor import autocast_context

    if output_dir is None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    if evaluator is None:
        evaluator = build_evaluator(cfg, dataset_name, output_dir)
    device = _model_device(model)
    dtype = inference_dtype(cfg, model)
    logger.info("Evaluating %s (task %s) on %s, %s, batch %d", dataset_name, task or "from the data set", device,
                f"{dtype} autocast" if dtype is not None else "fp32", cfg.TEST.PSALM.IMS_PER_BATCH)
    with full_params_for_inference(model, cfg.SOLVER.FSDP.RESHARD_AFTER_FORWARD):
        if MetadataCatalog.get(dataset_name).get("evaluator_type", None) == "davis":
            from psalm.inference import VideoObjectSegmenter, inference_on_davis

            bare = unwrap_model(model)
            was_training = bare.training
            bare.eval()
            try:
                segmenter = VideoObjectSegmenter(cfg, bare, autocast_dtype=dtype)
                return inference_on_davis(segmenter, DatasetCatalog.get(dataset_name), evaluator)
            finally:
                bare.train(was_training)
        loader = _ProgressLoader(build_test_loader(cfg, dataset_name, task), desc=dataset_name)
        with autocast_context(device, dtype):
            return inference_on_dataset(model, loader, evaluator)


def evaluate_datasets(cfg, model, names: Sequence[str], tasks: Sequence[str] = (), evaluators=None) -> OrderedDict:
    """:func:`evaluate_dataset` on each of ``names`` (with ``tasks[i]`` when given); results printed in
    detectron2's CSV format on the main process. Returns ``OrderedDict`` name -> results."""
    names, tasks = list(names), list(tasks)
    if tasks and len(tasks) != len(names):
        raise ValueError(f"DATASETS.TEST_TASKS has {len(tasks)} entries for {len(names)} DATASETS.TEST data sets")
    if evaluators is not None and len(evaluators) != len(names):
        raise ValueError(f"{len(evaluators)} evaluators for {len(names)} DATASETS.TEST data sets")
    results = OrderedDict()
    for i, name in enumerate(names):
        results[name] = evaluate_dataset(cfg, model, name, tasks[i] if tasks else None,
                                         evaluators[i] if evaluators is not None else None)
        if comm.is_main_process():
            logger.info("Evaluation results for %s in csv format:", name)
            print_csv_format(results[name])
    return results


def load_weights_for_evaluation(model, path: str, *, allow_missing: bool = False):
    """Load ``MODEL.WEIGHTS`` for evaluation; the same policy in every tool.

    An empty ``path`` or a checkpoint that leaves model tensors missing / mis-shaped is a ``ValueError``
    (the metrics of a partly random model are meaningless) unless ``allow_missing`` (the tools'
    ``--allow-missing-keys``), which logs a warning instead.
    """
    from .checkpoint import load_model_weights

    if not path:
        msg = "MODEL.WEIGHTS is empty: the model would be evaluated with random weights (meaningless metrics)"
        if not allow_missing:
            raise ValueError(f"{msg}; set MODEL.WEIGHTS, or pass {ALLOW_MISSING_FLAG} to evaluate them on purpose")
        logger.warning("%s (%s)", msg, ALLOW_MISSING_FLAG)
        return None
    try:
        return load_model_weights(model, path, allow_incomplete=allow_missing)
    except ValueError as e:
        raise ValueError(f"{e}, or pass {ALLOW_MISSING_FLAG} to evaluate with those tensors random") from None
