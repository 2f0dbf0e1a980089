"""Training hooks and the console metric printer.

* :class:`PeriodicCheckpointer`: saves on EVERY rank (saving is collective under FSDP / ZeRO; rank 0
  writes) every ``period`` iterations and at the end, keeping at most ``max_to_keep`` periodic files.
* :class:`EvalHook`: detectron2's, but evaluation leaves the global RNG states untouched, so a run
  with evaluation continues exactly like a resumed run without it.
* :class:`MetricPrinter`: one console line per period with the total loss, the per-task totals,
  the learning rate and timings (every individual loss goes to ``metrics.json`` / TensorBoard).
"""
from __future__ import annotations

import datetime
import logging
import os
import re
from typing import Optional

import torch
from detectron2.engine import hooks as d2_hooks
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, get_event_storage

from .rng import preserve_rng_state

__all__ = ["PeriodicCheckpointer", "EvalHook", "MetricPrinter"]

logger = logging.getLogger(__name__)


class PeriodicCheckpointer(HookBase):
    """Save ``model_{iter:07d}`` every ``period`` iterations and ``model_final`` at ``max_iter``.

    Must be registered on every rank (the save is collective). ``max_to_keep`` > 0 deletes the
    oldest periodic checkpoints beyond that number (``model_final`` is never deleted). The count
    includes the periodic files already in the folder when training starts (a resumed run's
    earlier checkpoints), so pruning survives a resume.
    """

    def __init__(self, checkpointer, period: int, max_to_keep: int = 0, file_prefix: str = "model"):
        self.checkpointer = checkpointer
        self.period = int(period)
        self.max_to_keep = int(max_to_keep)
        self.file_prefix = file_prefix
        self._recent: list[str] = []

    def existing_checkpoints(self) -> list[str]:
        """Periodic checkpoints ``<prefix>_<7 digits>.pth`` in the save folder, oldest iteration first."""
        folder = self.checkpointer.save_dir
        if not folder or not os.path.isdir(folder):
            return []
        pattern = re.compile(re.escape(self.file_prefix) + r"_(\d{7})\.pth")
        found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := pattern.fullmatch(name))]
        return [os.path.join(folder, name) for _, name in sorted(found)]

    def before_train(self):
        self._recent = self.existing_checkpoints()

    def _prune(self) -> None:
        if self.max_to_keep <= 0 or not comm.is_main_process():
            return
        while len(self._recent) > self.max_to_keep:
            old = self._recent.pop(0)
            if os.path.exists(old) and not old.endswith(f"{self.file_prefix}_final.pth"):
                logger.info("Removing old checkpoint %s (SOLVER.CHECKPOINT_MAX_TO_KEEP=%d)", old, self.max_to_keep)
                os.remove(old)

    def after_step(self):
        it = self.trainer.iter
        max_iter = self.trainer.max_iter
        if it + 1 >= max_iter:
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=it)
        elif self.period > 0 and (it + 1) % self.period == 0:
            name = f"{self.file_prefix}_{it:07d}"
            self.checkpointer.save(name, iteration=it)
            path = os.path.join(self.checkpointer.save_dir, name + ".pth")
            if path in self._recent:  # re-saved after a resume from an earlier file: now the newest
                self._recent.remove(path)
            self._recent.append(path)
            self._prune()


class EvalHook(d2_hooks.EvalHook):
    """detectron2's ``EvalHook`` with the global RNG states preserved across each evaluation."""

    def _do_eval(self):
        with preserve_rng_state():
            super()._do_eval()


class MetricPrinter(EventWriter):
    """Console line: ``iter`` / ``eta`` / ``total_loss`` / per-task ``*/total_loss`` / ``lr`` / times."""

    def __init__(self, max_iter: Optional[int] = None, window_size: int = 20):
        self.logger = logging.getLogger("psalm.engine")
        self._max_iter = max_iter
        self._window_size = window_size

    def _eta(self, storage) -> Optional[str]:
        if self._max_iter is None or "time" not in storage.histories():
            return None
        seconds = storage.history("time").median(1000) * (self._max_iter - storage.iter - 1)
        return str(datetime.timedelta(seconds=int(seconds)))

    def write(self):
        storage = get_event_storage()
        iteration = storage.iter
        if self._max_iter is not None and iteration == self._max_iter:
            return  # after training: nothing new
        histories = storage.histories()
        parts = [f"iter: {iteration}"]
        eta = self._eta(storage)
        if eta:
            parts.insert(0, f"eta: {eta}")
        losses = ["total_loss"] + sorted(k for k in histories if k.endswith("/total_loss"))
        for key in losses:
            if key in histories:
                parts.append(f"{key}: {histories[key].median(self._window_size):.4g}")
        for key, fmt in (("time", "{:.4f}"), ("data_time", "{:.4f}"), ("lr", "{:.5g}"), ("grad_norm", "{:.3g}")):
            if key in histories:
                parts.append(f"{key}: " + fmt.format(histories[key].avg(self._window_size) if key.endswith("time")
                                                      else histories[key].latest()))
        if torch.cuda.is_available():
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated() / 1024 ** 2:.0f}M")
        self.logger.info("  ".join(parts))
