"""``PSALMTrainer``: detectron2's ``DefaultTrainer`` workflow for PSALM's multi-task training.

What it adds to detectron2's defaults (every choice is a config key, see ``psalm/config.py``):

* model wrapping per ``SOLVER.SHARDING`` (``ddp`` | ``fsdp`` | ``zero``; :mod:`.distributed`), built
  BEFORE the optimiser so that FSDP's sharded parameters are the ones optimised;
* AdamW (``SOLVER.OPTIMIZER``, ``BETAS``, weight decay 0 by default), detectron2's warmup + cosine
  schedule (``SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"``), gradient clipping
  (``SOLVER.CLIP_GRADIENTS``, after unscaling);
* bf16 / fp16 autocast on GPU (``SOLVER.AMP.ENABLED`` / ``PRECISION``; fp16 uses a ``GradScaler``);
  on CPU the run is fp32 (logged);
* the multi-task loader (:func:`psalm.data.samplers.build_psalm_train_loader`), whose position is
  checkpointed; data loading draws from its own RNG stream (:class:`.rng.RNGStreams`);
* atomic checkpoints with model, optimiser, scheduler, iteration, loader position and the
  Python / NumPy / torch RNG states of every rank (:mod:`.checkpoint`), so that ``--resume``
  continues exactly as the uninterrupted run would have;
* per-task losses in the metrics (``<task>/<loss>``, ``<task>/total_loss``);
* per-task evaluation of ``DATASETS.TEST`` (task from ``DATASETS.TEST_TASKS`` or the data set) through
  :mod:`.evaluation`, the path ``tools/eval_zero_shot.py`` uses too;
* the initial weights of a run that does not resume (:meth:`PSALMTrainer.initialize_weights`):
  ``MODEL.PSALM.INIT.*`` and ``MODEL.WEIGHTS``, every model key from exactly one source
  (:mod:`psalm.checkpoint.init`); a frozen parameter left random is an error unless the config
  trains from scratch on purpose (``MODEL.PSALM.INIT.FROM_SCRATCH``).

The trainer does not depend on PSALM's internals: any META_ARCH model that returns a loss dict in
training works. The only PSALM-specific check: with ``MODEL.PSALM.FREEZE_BACKBONE`` and
``BACKBONE_EVAL_MODE``, a ``model.backbone`` left in training mode by ``model.train()`` is an error.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine import hooks as d2_hooks
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter, TensorboardXWriter, get_event_storage
from detectron2.utils.logger import setup_logger

from .checkpoint import OptimizerState, PerRankState, PSALMCheckpointer
from .distributed import is_fsdp, unwrap_model, wrap_model
from .hooks import EvalHook, MetricPrinter, PeriodicCheckpointer
from .optim import apply_trainable_patterns, build_optimizer, clip_gradients
from .rng import RNGStreams

__all__ = ["PSALMTrainer", "PSALMTrainStep", "resolve_amp", "resolve_device", "batch_task"]

logger = logging.getLogger(__name__)


def resolve_device(cfg) -> str:
    """``MODEL.DEVICE``, checked: a CUDA device on a machine without CUDA is an error (never a silent,
    full-size fp32 CPU run). Call on an unfrozen config before building anything."""
    device = cfg.MODEL.DEVICE
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"MODEL.DEVICE={device!r} is not a valid torch device (use 'cpu' or 'cuda[:N]')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE={device!r} but CUDA is not available on this machine (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda}); check the driver / CUDA_VISIBLE_DEVICES, or run on CPU on purpose "
            "with MODEL.DEVICE cpu"
        )
    return device


def resolve_amp(cfg, device: torch.device):
    """(autocast dtype or None, GradScaler or None) for ``SOLVER.AMP`` on ``device``."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None, None
    precision = cfg.SOLVER.AMP.PRECISION
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"SOLVER.AMP.PRECISION must be 'bf16' or 'fp16', got {precision!r}")
    if device.type != "cuda":
        logger.warning("SOLVER.AMP.ENABLED on %s: mixed precision is GPU-only here, training in fp32", device.type)
        return None, None
    if precision == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def batch_task(batch) -> Optional[str]:
    """The task of a single-task batch (``list`` of dicts with ``task``); None if it has none."""
    if not isinstance(batch, (list, tuple)) or not batch or not isinstance(batch[0], dict):
        return None
    tasks = {d.get("task") for d in batch}
    if len(tasks) != 1:
        raise ValueError(f"a training batch must hold one task, got {sorted(map(str, tasks))}")
    return tasks.pop()


class PSALMTrainStep(SimpleTrainer):
    """One iteration: data (own RNG stream) -> forward (autocast) -> backward -> clip -> step.

    Unlike ``SimpleTrainer`` the data-loader iterator is created lazily at the first step, i.e.
    after a resume has restored the loader's position.
    """

    def __init__(self, model, data_loader, optimizer, *, rng: RNGStreams, amp_dtype=None, grad_scaler=None,
                 clip_cfg=None, mode_check=None, same_task_check: bool = False):
        TrainerBase.__init__(self)
        model.train()
        self.model = model
        self.data_loader = data_loader
        self.optimizer = optimizer
        self.rng = rng
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler
        self.clip_cfg = clip_cfg
        self.mode_check = mode_check
        self.same_task_check = same_task_check
        self._iterator = None
        if mode_check is not None:
            mode_check(model)

    @property
    def _data_loader_iter(self):
        if self._iterator is None:
            with self.rng.data_stream():
                self._iterator = iter(self.data_loader)
        return self._iterator

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def run_step(self):
        assert self.model.training, "[PSALMTrainStep] model was changed to eval mode!"
        if self.mode_check is not None:
            self.mode_check(self.model)
        start = time.perf_counter()
        iterator = self._data_loader_iter
        with self.rng.data_stream():
            data = next(iterator)
        data_time = time.perf_counter() - start
        task = batch_task(data)
        if self.same_task_check:
            tasks = comm.all_gather(task)
            if len(set(tasks)) != 1:
                raise RuntimeError(f"ranks run different tasks this iteration ({tasks}); FSDP needs the same task "
                                   "on every rank (use psalm's MultiTaskBatchSampler)")

        with self._autocast():
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        grad_norm = None
        if self.clip_cfg is not None and self.clip_cfg.ENABLED:
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
            grad_norm = clip_gradients(self.clip_cfg, self.model.parameters())
        self.write_task_metrics(loss_dict, data_time, task, grad_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    @staticmethod
    def write_task_metrics(loss_dict: Dict[str, torch.Tensor], data_time: float, task: Optional[str],
                           grad_norm: Optional[torch.Tensor] = None) -> None:
        """Log losses (averaged over ranks), also as ``<task>/<loss>`` and ``<task>/total_loss``.

        Ranks may have run different tasks: every task's values are averaged over the ranks that
        ran it; ``total_loss`` is averaged over all ranks.
        """
        local = {
            "task": task,
            "losses": {k: float(v.detach()) for k, v in loss_dict.items()},
            "data_time": data_time,
            "grad_norm": None if grad_norm is None else float(grad_norm),
        }
        gathered = comm.gather(local)
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        storage.put_scalar("data_time", max(x["data_time"] for x in gathered))
        totals = [sum(x["losses"].values()) for x in gathered]
        total = float(np.mean(totals))
        if not np.isfinite(total):
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration={storage.iter}! per-rank losses: "
                f"{[x['losses'] for x in gathered]}"
            )
        storage.put_scalar("total_loss", total)
        by_task: Dict[str, list] = {}
        for x, t in zip(gathered, totals):
            by_task.setdefault(x["task"] or "all", []).append((x["losses"], t))
        for name, entries in by_task.items():
            keys = sorted({k for losses, _ in entries for k in losses})
            scalars = {f"{name}/{k}": float(np.mean([losses[k] for losses, _ in entries if k in losses])) for k in keys}
            scalars[f"{name}/total_loss"] = float(np.mean([t for _, t in entries]))
            storage.put_scalars(**scalars)
        norms = [x["grad_norm"] for x in gathered if x["grad_norm"] is not None]
        if norms:
            storage.put_scalar("grad_norm", float(np.mean(norms)))

    def state_dict(self):
        return TrainerBase.state_dict(self)

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)


def _backbone_mode_check(cfg):
    """A check that a frozen, eval-mode backbone stayed in eval mode (None when not configured)."""
    psalm = cfg.MODEL.get("PSALM", None)
    if psalm is None or not (psalm.FREEZE_BACKBONE and psalm.BACKBONE_EVAL_MODE):
        return None

    def check(model):
        backbone = getattr(unwrap_model(model), "backbone", None)
        if backbone is not None and backbone.training:
            raise RuntimeError(
                "model.train() left the frozen backbone in training mode although "
                "MODEL.PSALM.BACKBONE_EVAL_MODE=True; the model's train() must keep it in eval mode"
            )

    return check


class PSALMTrainer(DefaultTrainer):
    """``trainer = PSALMTrainer(cfg); trainer.resume_or_load(resume); trainer.train()``."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("psalm").isEnabledFor(logging.INFO):
            setup_logger(name="psalm", distributed_rank=comm.get_rank())
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        apply_trainable_patterns(model, cfg.SOLVER.TRAINABLE_PARAMETERS)
        data_loader = self.build_train_loader(cfg)
        model = wrap_model(cfg, model)
        optimizer = self.build_optimizer(cfg, model)
        device = next(model.parameters()).device
        amp_dtype, grad_scaler = resolve_amp(cfg, device)
        seed = cfg.SEED if cfg.SEED >= 0 else 0
        self.rng = RNGStreams(int(np.random.SeedSequence([seed, comm.get_rank(), 1]).generate_state(1)[0]))
        self._trainer = PSALMTrainStep(
            model, data_loader, optimizer, rng=self.rng, amp_dtype=amp_dtype, grad_scaler=grad_scaler,
            clip_cfg=cfg.SOLVER.CLIP_GRADIENTS, mode_check=_backbone_mode_check(cfg),
            same_task_check=is_fsdp(model),
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        checkpointables = {"trainer": weakref.proxy(self), "optimizer": OptimizerState(model, optimizer),
                           "rng": PerRankState(self.rng)}
        if hasattr(data_loader, "state_dict") and hasattr(data_loader, "load_state_dict"):
            checkpointables["data_loader"] = data_loader
        else:
            logger.warning("the train loader has no state_dict(): a resumed run will not continue its data order")
        if grad_scaler is not None:
            checkpointables["grad_scaler"] = grad_scaler
        self.checkpointer = PSALMCheckpointer(model, cfg.OUTPUT_DIR, **checkpointables)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------ weights
    def resume_or_load(self, resume: bool = True):
        """``resume`` and a ``last_checkpoint`` in ``OUTPUT_DIR``: continue from it (model, optimiser, ...).
        Otherwise start at iteration 0 from the initial weights (:meth:`initialize_weights`)."""
        if resume and self.checkpointer.has_checkpoint():
            self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=True)
            self.start_iter = self.iter + 1
            return
        self.initialize_weights(self.cfg, self.model)
        self.start_iter = 0

    @classmethod
    def initialize_weights(cls, cfg, model):
        """Load ``MODEL.PSALM.INIT.WEIGHTS`` (+ ``MODEL.WEIGHTS``) into ``model`` strictly by prefix.

        Every key of the model comes from exactly one source (a file entry, weights the model holds since
        it was built (:meth:`prebuilt_weight_sources`), or ``MODEL.PSALM.INIT.RANDOM``); a frozen
        parameter left random is an error unless ``MODEL.PSALM.INIT.FROM_SCRATCH`` or ``FROZEN_RANDOM``.
        Returns the :class:`psalm.checkpoint.init.InitPlan`.
        """
        from psalm.checkpoint.init import parse_init_entries, plan_initialization

        from .checkpoint import load_partial_state_dict

        init = cfg.MODEL.PSALM.INIT
        entries = parse_init_entries(list(init.WEIGHTS), cfg.MODEL.WEIGHTS)
        bare = unwrap_model(model)
        plan = plan_initialization(
            {k: tuple(v.shape) for k, v in bare.state_dict().items()},
            entries,
            random_patterns=list(init.RANDOM),
            from_scratch=bool(init.FROM_SCRATCH),
            prebuilt=cls.prebuilt_weight_sources(cfg),
            frozen=[n for n, p in bare.named_parameters() if not p.requires_grad],
            frozen_random=list(init.FROZEN_RANDOM),
        )
        if plan.state_dict:
            load_partial_state_dict(model, plan.state_dict)
        logger.info("Initial weights (iteration 0):\n%s", plan.summary())
        return plan

    @classmethod
    def prebuilt_weight_sources(cls, cfg) -> dict | None:
        """``{state-dict prefix: description}`` of the weights the model already holds when built (PSALM: the
        LLM loaded from ``MODEL.PSALM.LLM.NAME_OR_PATH``), for :meth:`initialize_weights`. Projects override it."""
        from psalm.checkpoint.init import llm_weights_dir

        llm_dir = llm_weights_dir(cfg)
        return {"llm.": f"MODEL.PSALM.LLM.NAME_OR_PATH ({llm_dir})"} if llm_dir else None

    @classmethod
    def weights_loaded_at_build(cls, cfg) -> str:
        """Non-empty (a description) when building the model loads ALL its weights (e.g. a converted release
        directory): ``--eval-only`` then evaluates it as built when no ``MODEL.WEIGHTS`` is given
        (:func:`psalm.engine.defaults.train_or_evaluate`). PSALM: never ("")."""
        return ""

    # ------------------------------------------------------------------ state (iteration + hooks)
    def state_dict(self):
        return TrainerBase.state_dict(self)

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)

    # ------------------------------------------------------------------ building blocks
    @classmethod
    def build_model(cls, cfg):
        import psalm.modeling  # noqa: F401  (registers the PSALM meta-architecture)

        model = build_model(cfg)
        n_total = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("Model %s: %.2fM parameters, %.2fM trainable", type(model).__name__, n_total / 1e6, n_train / 1e6)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """:func:`psalm.engine.optim.build_lr_scheduler` (detectron2's schedules + ``"WarmupDecayLR"``)."""
        from .optim import build_lr_scheduler

        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        from psalm.data.samplers import build_psalm_train_loader

        return build_psalm_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, task: Optional[str] = None):
        from .evaluation import build_test_loader

        return build_test_loader(cfg, dataset_name, task)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from psalm.evaluation import build_evaluator

        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        cfg = self.cfg
        ret = [
            d2_hooks.IterationTimer(),
            d2_hooks.LRScheduler(),
            PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP),
        ]
        if cfg.DATASETS.TEST:
            def test_and_save_results():
                self._last_eval_results = self.test(self.cfg, self.model)
                return self._last_eval_results

            ret.append(EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        if comm.is_main_process():
            ret.append(d2_hooks.PeriodicWriter(self.build_writers(), period=cfg.SOLVER.LOG_PERIOD))
        return ret

    def build_writers(self):
        os.makedirs(self.cfg.OUTPUT_DIR, exist_ok=True)
        return [
            MetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    def train(self):
        """Train from ``start_iter`` to ``SOLVER.MAX_ITER``; returns the last evaluation results (or None)."""
        TrainerBase.train(self, self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", None)

    # ------------------------------------------------------------------ evaluation
    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on every ``DATASETS.TEST`` entry with its task (``DATASETS.TEST_TASKS``)
        through :func:`psalm.engine.evaluation.evaluate_datasets` (``TEST.PSALM.DTYPE``,
        ``TEST.PSALM.IMS_PER_BATCH``: the path ``tools/eval_zero_shot.py`` uses).

        Returns:
            ``OrderedDict`` data-set name -> results (one data set: its results directly, as detectron2).
        """
        from .evaluation import evaluate_datasets

        results = evaluate_datasets(cfg, model, cfg.DATASETS.TEST, cfg.DATASETS.TEST_TASKS, evaluators)
        if len(results) == 1:
            return list(results.values())[0]
        return results
