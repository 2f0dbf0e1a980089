"""Process launching and model wrapping: DDP, FSDP (``fully_shard``) or ZeRO, on GPU or CPU.

Launching (:func:`launch`), in this order:

1. started by ``torchrun`` (env ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``):
   join the process group from the environment (NCCL with CUDA, else gloo) and run ``main``;
2. one process in total: run ``main`` directly;
3. CUDA available: detectron2's ``launch`` (one process per GPU, NCCL);
4. no CUDA: spawn ``num_gpus_per_machine`` CPU processes with the gloo backend (detectron2's
   ``launch`` asserts CUDA), so ``--num-gpus N`` means N processes on a CPU machine.

Wrapping (:func:`wrap_model`, ``SOLVER.SHARDING``):

* ``"ddp"``: ``DistributedDataParallel`` (``find_unused_parameters`` from
  ``SOLVER.DDP_FIND_UNUSED_PARAMETERS``: single-task batches leave other tasks' heads unused);
* ``"zero"``: the same DDP model, with the optimiser states sharded (see ``optim.build_optimizer``);
* ``"fsdp"``: PyTorch FSDP2 ``fully_shard`` on every sub-module whose class name is in
  ``SOLVER.FSDP.WRAP_MODULES`` and then on the root; parameters, gradients and optimiser states
  are sharded. All ranks must run the same task each iteration (the task sampler guarantees it).
  With bf16 training (``SOLVER.AMP.ENABLED`` and ``PRECISION`` ``"bf16"`` on a GPU) every unit
  gets the mixed-precision policy ``param_dtype=bf16, reduce_dtype=fp32``
  (:func:`fsdp_mixed_precision_policy`): parameters are all-gathered and computed in bf16 (half
  the all-gather traffic and unsharded memory of fp32), gradients are reduce-scattered in fp32 and
  the sharded fp32 parameters stay the optimiser's master copy. fp16 and fp32 training keep fp32
  all-gathers (fp16 relies on autocast + ``GradScaler``).

Communication sizes: DDP (and ``"zero"``, which wraps the same DDP) uses PyTorch's default
gradient buckets, ``bucket_cap_mb=25`` (the first bucket 1 MiB), all-reduced in the gradients'
dtype (fp32: the parameters stay fp32 under autocast). FSDP communicates one unit at a time: one
all-gather of the unit's parameters in the forward (and again in the backward when
``SOLVER.FSDP.RESHARD_AFTER_FORWARD``), one reduce-scatter of its gradients; with the default
``WRAP_MODULES`` a unit is a Phi-1.5 decoder layer (50.3 M parameters: 101 MB in bf16) or a Swin
stage, and the root unit holds everything else.

One process uses the bare model whatever ``SOLVER.SHARDING`` says.
"""
from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = [
    "SHARDING_MODES",
    "launch",
    "init_from_torchrun_env",
    "launched_by_torchrun",
    "wrap_model",
    "fsdp_mixed_precision_policy",
    "unwrap_model",
    "is_fsdp",
    "full_params_for_inference",
]

logger = logging.getLogger(__name__)

SHARDING_MODES = ("ddp", "fsdp", "zero")
DEFAULT_TIMEOUT = timedelta(minutes=30)


# ----------------------------------------------------------------------------- process groups
def _set_local_process_group(world_size: int, local_size: int, machine_rank: int) -> None:
    """detectron2's ``comm`` needs a per-machine group for ``get_local_rank`` / ``get_local_size``."""
    if world_size % local_size:
        raise ValueError(f"world size {world_size} is not a multiple of the processes per machine {local_size}")
    for i in range(world_size // local_size):
        group = dist.new_group(list(range(i * local_size, (i + 1) * local_size)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_from_torchrun_env(timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Join the process group that ``torchrun`` describes in the environment."""
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", timeout=timeout)
    _set_local_process_group(world_size, local_size, rank // local_size)
    comm.synchronize()


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    except Exception:
        logger.error("could not join the gloo process group at %s", dist_url)
        raise
    _set_local_process_group(world_size, num_per_machine, machine_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str | None = None, args=(), timeout: timedelta = DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` in every process of the job (see the module docstring)."""
    if launched_by_torchrun():
        init_from_torchrun_env(timeout)
        return main_func(*args)
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if torch.cuda.is_available():
        return d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args,
                         timeout=timeout)
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError("multi-machine CPU jobs need an explicit --dist-url tcp://HOST:PORT")
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            dist_url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    logger.info("No CUDA: launching %d CPU process(es) per machine with the gloo backend", num_gpus_per_machine)
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


# ----------------------------------------------------------------------------- wrapping
def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user module inside DDP (FSDP2 modifies the module in place, so it is its own unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_model(cfg, model: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``model`` for ``comm.get_world_size()`` processes per ``SOLVER.SHARDING``."""
    mode = cfg.SOLVER.SHARDING
    if mode not in SHARDING_MODES:
        raise ValueError(f"SOLVER.SHARDING must be one of {SHARDING_MODES}, got {mode!r}")
    world_size = comm.get_world_size()
    if world_size == 1:
        if mode != "ddp":
            logger.info("SOLVER.SHARDING=%r has no effect with one process: training the bare model", mode)
        return model
    device = next(model.parameters()).device
    if mode in ("ddp", "zero"):
        # buffers (e.g. BatchNorm statistics) are synced once at construction, not every forward
        import inspect

        sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
                   else "broadcast_buffers")
        kwargs = {sync_kw: False, "find_unused_parameters": cfg.SOLVER.DDP_FIND_UNUSED_PARAMETERS}
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index if device.index is not None else comm.get_local_rank()]
        return torch.nn.parallel.DistributedDataParallel(model, **kwargs)

    return fsdp_shard(cfg, model, fsdp_mixed_precision_policy(cfg, device))


def fsdp_mixed_precision_policy(cfg, device: torch.device):
    """FSDP2 ``MixedPrecisionPolicy`` for the training precision, or None (fp32 all-gathers).

    bf16 training (``SOLVER.AMP.ENABLED``, ``SOLVER.AMP.PRECISION == "bf16"``, on a GPU: mixed
    precision is GPU-only, as in :func:`psalm.engine.trainer.resolve_amp`) gives
    ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``. fp16 keeps
    fp32 parameters (autocast + ``GradScaler``), and so does fp32 training.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not cfg.SOLVER.AMP.ENABLED or torch.device(device).type != "cuda":
        return None
    if cfg.SOLVER.AMP.PRECISION != "bf16":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fsdp_shard(cfg, model: torch.nn.Module, mp_policy=None) -> torch.nn.Module:
    """``fully_shard`` the ``SOLVER.FSDP.WRAP_MODULES`` units, then the root, over all processes.

    Args:
        mp_policy: a ``MixedPrecisionPolicy`` for every unit (:func:`fsdp_mixed_precision_policy`
            gives the one of the config), or None for none.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (comm.get_world_size(),))
    names = set(cfg.SOLVER.FSDP.WRAP_MODULES)
    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.SOLVER.FSDP.RESHARD_AFTER_FORWARD,
              "mp_policy": mp_policy or MixedPrecisionPolicy()}
    # children before parents (post-order) so that every unit is sharded before its container
    units = [m for m in _post_order(model) if type(m).__name__ in names and m is not model]
    for m in units:
        fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    logger.info("FSDP: %d sharded unit(s) of classes %s plus the root; mixed precision %s", len(units),
                sorted(names), "none (fp32)" if mp_policy is None else mp_policy)
    if not units:
        logger.warning("FSDP: no sub-module of a class in SOLVER.FSDP.WRAP_MODULES=%s; one unit for the "
                       "whole model (all parameters gathered at once)", sorted(names))
    return model


def _post_order(module: torch.nn.Module):
    for child in module.children():
        yield from _post_order(child)
    yield module


@contextlib.contextmanager
def full_params_for_inference(model: torch.nn.Module, reshard_after_forward: bool = True):
    """Gather the full parameters of an FSDP model on every rank for the block (no-op otherwise).

    Inside, forward passes need no communication, so ranks may run different numbers of
    inference batches (``inference_on_dataset`` with uneven shards).
    """
    if not is_fsdp(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(reshard_after_forward)
