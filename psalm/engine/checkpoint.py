"""Atomic, sharding-aware checkpoints with everything needed for an exact resume.

:class:`PSALMCheckpointer` keeps detectron2's ``DetectionCheckpointer`` conventions (``<name>.pth``
files with a top-level ``"model"`` key, a ``last_checkpoint`` tag, ``resume_or_load``) and adds:

* **atomic files**: data go to a temporary file in the same folder, are ``fsync``-ed and then
  ``os.replace``-d over the target (the folder is ``fsync``-ed too). A crash at any moment leaves
  either the previous file or the new one, never a torn one; the ``last_checkpoint`` tag is written
  the same way and only after the checkpoint itself.
* **full state under any sharding**: the model and optimiser states are gathered with
  ``torch.distributed.checkpoint.state_dict`` (DDP, FSDP2) or ZeRO's ``consolidate_state_dict``;
  optimiser states are always stored with parameter NAMES as keys, so a checkpoint resumes under
  any ``SOLVER.SHARDING`` and world size. ``save`` is therefore COLLECTIVE: every rank calls it,
  rank 0 writes.
* **per-rank state** (:class:`PerRankState`, e.g. RNG states) is gathered from every rank and
  given back to the same rank on load.
* files load with ``torch.load(weights_only=True, mmap=True)``: no arbitrary code runs on load, and
  the tensors are memory-mapped, so the ranks of a node resuming together share one copy of the file
  in the page cache instead of each loading the full model and optimiser state into its memory.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
from typing import Any, Dict, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from fvcore.common.checkpoint import _IncompatibleKeys, _strip_prefix_if_present

from .distributed import is_fsdp, unwrap_model

__all__ = [
    "atomic_save",
    "atomic_write_text",
    "PSALMCheckpointer",
    "PerRankState",
    "OptimizerState",
    "load_model_weights",
    "load_partial_state_dict",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- atomic files
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------- checkpointables
class PerRankState:
    """Checkpointable adapter: ``state_dict()`` gathers ``obj``'s state from every rank (a list);
    ``load_state_dict(list)`` gives each rank its own entry back."""

    def __init__(self, obj):
        self.obj = obj

    def state_dict(self):
        return comm.all_gather(self.obj.state_dict())

    def load_state_dict(self, states) -> None:
        rank, world = comm.get_rank(), comm.get_world_size()
        if len(states) != world:
            logger.warning(
                "checkpoint holds per-rank state of %d process(es), this job has %d: rank %d uses entry %d; "
                "the continuation is not an exact replay of the original run", len(states), world, rank,
                rank % len(states),
            )
        self.obj.load_state_dict(states[rank % len(states)])


def _param_names(model: torch.nn.Module) -> Dict[int, str]:
    return {id(p): name for name, p in unwrap_model(model).named_parameters()}


class OptimizerState:
    """Checkpointable adapter for the optimiser: full state keyed by parameter name (collective)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    @property
    def is_zero(self) -> bool:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return isinstance(self.optimizer, ZeroRedundancyOptimizer)

    def _ordered_names(self) -> list[str]:
        names = _param_names(self.model)
        return [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> Dict:
        if self.is_zero:
            self.optimizer.consolidate_state_dict(to=0)
            if not comm.is_main_process():
                return {}
            sd = self.optimizer.state_dict()
            names = self._ordered_names()
            return {
                "state": {names[i]: s for i, s in sd["state"].items()},
                "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]],
            }
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_state_dict(self, state: Dict) -> None:
        if self.is_zero:
            index = {n: i for i, n in enumerate(self._ordered_names())}
            missing = [n for g in state["param_groups"] for n in g["params"] if n not in index]
            if missing:
                raise KeyError(f"optimizer state has parameters the model does not train: {missing[:5]}")
            self.optimizer.load_state_dict(
                {
                    "state": {index[n]: s for n, s in state["state"].items()},
                    "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]],
                }
            )
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # strict=False: parameters that never received a gradient (e.g. the heads of a task that has
        # not been sampled yet) legitimately have no AdamW state
        set_optimizer_state_dict(
            self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        # set_optimizer_state_dict first initialises EVERY parameter's state with a zero-gradient step
        # (AdamW: step=1). A parameter without state in the checkpoint must start fresh, as in the
        # uninterrupted run, or its first real update would use the wrong bias correction.
        names = _param_names(self.model)
        saved = set(state.get("state", {}))
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if names.get(id(p)) not in saved:
                    self.optimizer.state.pop(p, None)


# ----------------------------------------------------------------------------- checkpointer
class PSALMCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic, sharding-aware saving (see the module docstring).

    Args:
        model: the model as trained (bare, DDP or FSDP2).
        save_dir: output folder.
        checkpointables: objects with ``state_dict`` / ``load_state_dict`` (wrap the optimiser in
            :class:`OptimizerState` and per-rank objects in :class:`PerRankState`).
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.wrapped_model = model

    # ------------------------------------------------------------------ saving (collective)
    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """The full model state dict on rank 0 ({} on other ranks when sharded). Collective."""
        if comm.get_world_size() == 1 and not is_fsdp(self.wrapped_model):
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.wrapped_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically. COLLECTIVE: call it on every rank."""
        if not self.save_dir:
            return
        data = {"model": self.model_state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data["world_size"] = comm.get_world_size()
        data.update(kwargs)
        if self.save_to_disk:
            basename = f"{name}.pth"
            path = os.path.join(self.save_dir, basename)
            logger.info("Saving checkpoint to %s", path)
            atomic_save(data, path)
            self.tag_last_checkpoint(basename)
        comm.synchronize()

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # ------------------------------------------------------------------ loading
    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file

            return {"model": load_file(filename)}
        if filename.endswith((".pth", ".pt")):
            from psalm.checkpoint.init import load_torch_file

            try:
                # memory-mapped: on resume every rank of a node reads the same file through the shared page
                # cache instead of holding its own copy of the full model + optimiser (~24 GB) in memory
                loaded = load_torch_file(filename)
            except pickle.UnpicklingError as e:
                raise RuntimeError(
                    f"{filename!r} holds Python objects that torch.load(weights_only=True) refuses to load "
                    f"({e}). psalm checkpoints contain only tensors and plain containers; convert a foreign "
                    "checkpoint with the tools/convert_*.py scripts"
                ) from e
            return loaded if "model" in loaded else {"model": loaded}
        return super()._load_file(filename)

    last_incompatible: Optional[_IncompatibleKeys] = None  # of the last load, for callers that must check it

    def _load_model(self, checkpoint: Dict[str, Any]) -> _IncompatibleKeys:
        self.last_incompatible = self._load_model_impl(checkpoint)
        return self.last_incompatible

    def _load_model_impl(self, checkpoint: Dict[str, Any]) -> _IncompatibleKeys:
        if not is_fsdp(self.wrapped_model):
            return super()._load_model(checkpoint)
        if checkpoint.get("matching_heuristics", False):
            raise ValueError("loading a converted .pkl into an FSDP model is not supported; load it into the "
                             "bare model before wrapping, or convert it to a psalm .pth first")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        sd = checkpoint.pop("model")
        self._convert_ndarray_to_tensor(sd)
        _strip_prefix_if_present(sd, "module.")
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}  # global shapes
        incorrect = [(k, tuple(v.shape), shapes[k]) for k, v in sd.items() if k in shapes and tuple(v.shape) != shapes[k]]
        for k, _, _ in incorrect:
            sd.pop(k)
        set_model_state_dict(self.wrapped_model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
        return _IncompatibleKeys(
            missing_keys=sorted(set(shapes) - set(sd) - {k for k, _, _ in incorrect}),
            unexpected_keys=sorted(set(sd) - set(shapes)),
            incorrect_shapes=incorrect,
        )


def load_model_weights(model: torch.nn.Module, path: str, *, allow_incomplete: bool = False) -> _IncompatibleKeys:
    """Load ``MODEL.WEIGHTS`` into ``model`` for inference / evaluation with :class:`PSALMCheckpointer`
    (psalm ``.pth``, safetensors, detectron2 ``.pkl``).

    A checkpoint that leaves model tensors missing or mis-shaped is a ``ValueError`` (a half-random
    model gives silently wrong results) unless ``allow_incomplete``, which logs a warning instead.
    """
    checkpointer = PSALMCheckpointer(model)
    checkpointer.load(path)
    inc = checkpointer.last_incompatible
    bad = (list(inc.missing_keys) + [k for k, *_ in inc.incorrect_shapes]) if inc is not None else []
    if bad:
        msg = (
            f"MODEL.WEIGHTS={path!r} leaves {len(bad)} model tensor(s) missing or mis-shaped, e.g. {bad[:5]}; "
            "convert the checkpoint first (tools/convert_official.py, tools/convert_mask2former.py) or check that "
            "the config matches it"
        )
        if not allow_incomplete:
            raise ValueError(msg)
        logger.warning(msg + "; continuing with those tensors at their initial values")
    return inc


def load_partial_state_dict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Copy ``state_dict`` (full tensors, a subset of the model's keys, checked by the caller) into
    ``model``: bare, DDP or FSDP2 (each rank keeps its shard)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    result = unwrap_model(model).load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"keys the model does not have: {result.unexpected_keys[:10]}")
