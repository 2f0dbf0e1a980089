"""Multi-task training: ONE task (data set) per iteration, single-task batches, exact resume.

``MultiTaskBatchSampler`` is an infinite batch sampler over T data sets (one task each). Every
iteration t picks one data set d(t):

* ``"random"`` (paper): d(t) drawn with probabilities ``ratios / sum(ratios)``;
* ``"round_robin"`` (official): data sets in order, data set d for ``ratios[d] * period``
  consecutive iterations (ratios must be integers; the official setting is all 1, period 16).

and then the next ``batch_size`` (GLOBAL batch) samples of d's own stream, which visits d in a
fresh random permutation every pass (like detectron2's ``TrainingSampler``). Rank r gets the
slice ``[r * batch_size / world_size, (r + 1) * batch_size / world_size)`` of that global batch.

The ratios may change during training (a curriculum, like ``SOLVER.STEPS`` for the learning rate):
``ratio_steps = (s_1, s_2, ...)`` with ``ratios_after_steps = (r_1, r_2, ...)`` use ``ratios`` for
iterations ``[0, s_1)``, ``r_1`` for ``[s_1, s_2)``, and so on (a round-robin cycle restarts at every step).

Everything is a pure function of ``(seed, t)``: the choice of data set for block ``t // 4096`` comes
from ``default_rng([seed, 0, block])``, the permutation of pass e of data set d from
``default_rng([seed, 1, d, e])`` and each sample's own seed (for the mapper's random choices)
from ``SeedSequence([seed, 2, t, position])``. Hence all ranks agree without communication, and
``state_dict()`` is just the iteration number: loading it replays the data-set choices to restore
every stream's position, so the continuation is exactly the one of an uninterrupted run.

``build_psalm_train_loader(cfg)`` builds the data sets from ``DatasetCatalog`` and returns a
:class:`PSALMTrainLoader`: an iterable of batches (``list`` of mapped dicts of one task) whose
``state_dict()`` counts the batches the TRAINER consumed (not the ones prefetched by workers).
"""
import logging
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch.utils.data as torchdata

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from psalm.structures.tasks import check_task

__all__ = ["MultiTaskBatchSampler", "MultiTaskDataset", "PSALMTrainLoader", "build_psalm_train_loader"]

logger = logging.getLogger(__name__)

_CHOICE_BLOCK = 4096  # data-set choices are drawn in blocks of this many iterations
SampleRef = Tuple[int, int, int]  # (data-set index, sample index, sample seed)


class MultiTaskBatchSampler:
    """Infinite batch sampler yielding, per iteration, this rank's ``[(dataset, index, seed), ...]``.

    Args:
        dataset_sizes: number of samples of each of the T data sets.
        batch_size: GLOBAL batch size (all ranks together); divisible by ``world_size``.
        ratios: T non-negative sampling weights (default: equal).
        ratio_steps: increasing iterations at which the ratios change (default: never).
        ratios_after_steps: one list of T weights per step, used from that step on.
        mode: ``"random"`` or ``"round_robin"``.
        round_robin_period: iterations per data set and ratio unit in round-robin mode.
        seed: shared by all ranks. None: a random seed shared by all ranks
            (``comm.shared_random_seed()``), replaced by the checkpoint's seed on resume.
        rank / world_size: default: detectron2 ``comm``.
    """

    def __init__(
        self,
        dataset_sizes: Sequence[int],
        batch_size: int,
        ratios: Optional[Sequence[float]] = None,
        ratio_steps: Sequence[int] = (),
        ratios_after_steps: Sequence[Sequence[float]] = (),
        mode: str = "random",
        round_robin_period: int = 16,
        seed: Optional[int] = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        self.dataset_sizes = [int(n) for n in dataset_sizes]
        num = len(self.dataset_sizes)
        if num == 0:
            raise ValueError("MultiTaskBatchSampler needs at least one data set")
        if mode not in ("random", "round_robin"):
            raise ValueError(f"mode must be 'random' or 'round_robin' (DATALOADER.TASK_SAMPLING), got {mode!r}")
        if mode == "round_robin" and round_robin_period <= 0:
            raise ValueError(f"round_robin_period must be positive, got {round_robin_period}")
        self.mode = mode
        self.round_robin_period = int(round_robin_period)
        steps = [int(x) for x in ratio_steps]
        if len(ratios_after_steps) != len(steps):
            raise ValueError(
                f"got {len(steps)} ratio steps but {len(ratios_after_steps)} lists of ratios after them "
                "(DATASETS.TRAIN_RATIO_STEPS vs DATASETS.TRAIN_RATIOS_AFTER_STEPS): give one list per step"
            )
        if any(b <= a for a, b in zip([0] + steps, steps)):
            raise ValueError(f"ratio steps must be positive and strictly increasing, got {steps}")
        default = [1.0] * num if ratios is None or len(ratios) == 0 else ratios
        self.ratios = self._check_ratios(default, "DATASETS.TRAIN_RATIOS")
        self.ratio_steps = steps
        self.ratios_after_steps = [
            self._check_ratios(r, f"DATASETS.TRAIN_RATIOS_AFTER_STEPS[{i}]") for i, r in enumerate(ratios_after_steps)
        ]
        self._explicit_seed = seed is not None
        self.seed = int(seed) if seed is not None else int(comm.shared_random_seed())
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.world_size = comm.get_world_size() if world_size is None else int(world_size)
        if batch_size <= 0 or batch_size % self.world_size:
            raise ValueError(f"global batch size {batch_size} must be a positive multiple of world size {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // self.world_size
        self._phase_starts = np.asarray([0] + steps, dtype=np.int64)
        phases = [self.ratios] + self.ratios_after_steps
        cdfs = np.cumsum(np.asarray(phases), axis=1)
        self._cdfs = cdfs / cdfs[:, -1:]  # [P, T]
        if mode == "round_robin":
            self._cycles = [
                np.concatenate([np.full(int(r) * self.round_robin_period, d, dtype=np.int64) for d, r in enumerate(rs)])
                for rs in phases
            ]
        self._start_iter = 0
        self._block_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)
        self._perm_cache: Dict[int, Tuple[int, np.ndarray]] = {}

    def _check_ratios(self, ratios: Sequence[float], name: str) -> List[float]:
        ratios = [float(r) for r in ratios]
        num = len(self.dataset_sizes)
        if len(ratios) != num:
            raise ValueError(f"got {len(ratios)} ratios for {num} data sets ({name} vs DATASETS.TRAIN)")
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError(f"{name} must be >= 0 with a positive sum, got {ratios}")
        for d, (n, r) in enumerate(zip(self.dataset_sizes, ratios)):
            if r > 0 and n <= 0:
                raise ValueError(f"data set {d} is empty but has sampling ratio {r} in {name}")
        if self.mode == "round_robin" and any(r != int(r) for r in ratios):
            raise ValueError(f"round_robin mode needs integer ratios (iterations per period) in {name}, got {ratios}")
        return ratios

    # ------------------------------------------------------------------ pure functions of (seed, t)
    def _choice_block(self, block: int) -> np.ndarray:
        if self._block_cache[0] != block:
            t = np.arange(block * _CHOICE_BLOCK, (block + 1) * _CHOICE_BLOCK)
            phase = np.searchsorted(self._phase_starts, t, side="right") - 1
            if self.mode == "random":
                # inverse-CDF draw: with one phase, the same numbers as rng.choice(T, p=ratios / sum)
                u = np.random.default_rng([self.seed, 0, block]).random(_CHOICE_BLOCK)
            choices = np.empty(_CHOICE_BLOCK, dtype=np.int64)
            for k in np.unique(phase):
                sel = phase == k
                if self.mode == "random":
                    choices[sel] = np.searchsorted(self._cdfs[k], u[sel], side="right")
                else:
                    cycle = self._cycles[k]
                    choices[sel] = cycle[(t[sel] - self._phase_starts[k]) % len(cycle)]
            self._block_cache = (block, choices)
        return self._block_cache[1]

    def dataset_at(self, iteration: int) -> int:
        """Index of the data set (task) of iteration ``iteration``."""
        return int(self._choice_block(iteration // _CHOICE_BLOCK)[iteration % _CHOICE_BLOCK])

    def _stream_index(self, dataset: int, k: int) -> int:
        """The k-th draw (k >= 0) of ``dataset``'s stream: a new permutation every pass."""
        n = self.dataset_sizes[dataset]
        epoch, pos = divmod(k, n)
        cached = self._perm_cache.get(dataset)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, 1, dataset, epoch]).permutation(n)
            self._perm_cache[dataset] = cached = (epoch, perm)
        return int(cached[1][pos])

    def _sample_seed(self, iteration: int, position: int) -> int:
        return int(np.random.SeedSequence([self.seed, 2, iteration, position]).generate_state(1)[0])

    def _consumed_before(self, iteration: int) -> List[int]:
        """Samples drawn from each data set's stream by iterations 0 .. iteration-1 (replay)."""
        counts = np.zeros(len(self.dataset_sizes), dtype=np.int64)
        full_blocks, rest = divmod(iteration, _CHOICE_BLOCK)
        for block in range(full_blocks):
            counts += np.bincount(self._choice_block(block), minlength=len(counts))
        if rest:
            counts += np.bincount(self._choice_block(full_blocks)[:rest], minlength=len(counts))
        return (counts * self.batch_size).tolist()

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[List[SampleRef]]:
        iteration = self._start_iter
        consumed = self._consumed_before(iteration)
        positions = range(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        while True:
            dataset = self.dataset_at(iteration)
            yield [
                (dataset, self._stream_index(dataset, consumed[dataset] + p), self._sample_seed(iteration, p))
                for p in positions
            ]
            consumed[dataset] += self.batch_size
            iteration += 1

    # ------------------------------------------------------------------ resume
    def _fingerprint(self) -> Dict:
        return {
            "seed": self.seed,
            "mode": self.mode,
            "ratios": list(self.ratios),
            "ratio_steps": list(self.ratio_steps),
            "ratios_after_steps": [list(r) for r in self.ratios_after_steps],
            "round_robin_period": self.round_robin_period,
            "dataset_sizes": list(self.dataset_sizes),
            "batch_size": self.batch_size,
        }

    def state_dict(self, iteration: Optional[int] = None) -> Dict:
        """``{"iteration": ..., **settings}``; ``iteration`` defaults to the start iteration set by
        :meth:`load_state_dict` (pass the number of batches consumed since the start)."""
        return {"iteration": self._start_iter if iteration is None else int(iteration), **self._fingerprint()}

    def load_state_dict(self, state: Dict) -> None:
        """Resume at ``state["iteration"]`` (applies to the next ``iter()``); the settings must match."""
        if not self._explicit_seed and "seed" in state and int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])  # random seed of the interrupted run
            self._block_cache, self._perm_cache = (-1, None), {}
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k in state and state[k] != v}
        if diff:
            raise ValueError(
                "cannot resume the task sampler: settings differ from the checkpoint "
                f"(key: (checkpoint, now)) {diff}; resume with the same DATASETS / SEED / batch size"
            )
        if int(state["iteration"]) < 0:
            raise ValueError(f"iteration must be >= 0, got {state['iteration']}")
        self._start_iter = int(state["iteration"])


class MultiTaskDataset(torchdata.Dataset):
    """Maps ``(dataset, index, seed)`` to ``mapper[dataset](dicts[dataset][index], rng)``."""

    def __init__(self, dataset_lists: Sequence[Sequence[Dict]], mappers: Sequence):
        if len(dataset_lists) != len(mappers):
            raise ValueError(f"{len(dataset_lists)} data sets but {len(mappers)} mappers")
        # serialised storage (detectron2): no per-worker copy-on-read growth of Python objects
        self.datasets = [DatasetFromList(list(d), copy=False, serialize=True) for d in dataset_lists]
        self.mappers = list(mappers)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, ref: SampleRef) -> Dict:
        dataset, index, seed = ref
        return self.mappers[dataset](self.datasets[dataset][index], rng=np.random.default_rng(seed))


def _trivial_batch_collator(batch):
    return batch


class PSALMTrainLoader:
    """Iterable of training batches (``list`` of mapped dicts, all of one task) with exact resume.

    ``state_dict()`` / ``load_state_dict()`` describe the position in batches the consumer has
    TAKEN from this iterator (prefetched batches are not counted); call ``load_state_dict`` before
    iterating.
    """

    def __init__(self, sampler: MultiTaskBatchSampler, dataset: MultiTaskDataset, num_workers: int = 0,
                 dataset_names: Sequence[str] = ()):
        self.sampler = sampler
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.dataset_names = list(dataset_names)
        self._consumed = 0
        self._start = 0

    def __iter__(self) -> Iterator[List[Dict]]:
        self.sampler.load_state_dict({"iteration": self._start + self._consumed})
        self._start, self._consumed = self._start + self._consumed, 0
        loader = torchdata.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=_trivial_batch_collator,
            pin_memory=False,
        )
        for batch in loader:
            self._consumed += 1
            yield batch

    def state_dict(self) -> Dict:
        return self.sampler.state_dict(iteration=self._start + self._consumed)

    def load_state_dict(self, state: Dict) -> None:
        self.sampler.load_state_dict(state)
        self._start, self._consumed = int(state["iteration"]), 0


def _dataset_task(cfg, i: int, name: str, dicts: List[Dict], check=check_task) -> str:
    if cfg.DATASETS.TRAIN_TASKS:
        return check(cfg.DATASETS.TRAIN_TASKS[i])
    task = MetadataCatalog.get(name).get("task", None)
    if task is None and dicts:
        task = dicts[0].get("task")
    if task is None:
        raise ValueError(f"no task for data set {name!r}: set DATASETS.TRAIN_TASKS or register it with a task")
    return check(task)


def build_psalm_train_loader(cfg, mapper_factory=None, task_check=None) -> PSALMTrainLoader:
    """Multi-task training loader from ``cfg.DATASETS.TRAIN`` (one task per data set).

    Args:
        cfg: config with DATASETS.TRAIN (+ TRAIN_TASKS, TRAIN_RATIOS, TRAIN_RATIO_STEPS,
            TRAIN_RATIOS_AFTER_STEPS), SOLVER.IMS_PER_BATCH (global
            batch), DATALOADER.{TASK_SAMPLING, ROUND_ROBIN_PERIOD, NUM_WORKERS,
            FILTER_EMPTY_ANNOTATIONS (instance data sets: drop images without annotations)}, SEED (< 0: a
            random seed shared by the ranks and stored in ``state_dict``).
        mapper_factory: ``f(cfg, dataset_name, task) -> callable(dict, rng=None)``; default
            :class:`PSALMDatasetMapper` for training with the data set's metadata and task.
        task_check: ``f(task) -> task``, raising ``ValueError`` for a task the mappers cannot map; default
            psalm's :func:`~psalm.structures.tasks.check_task`. A project whose mapper has tasks of its
            own (e.g. Pixel-SAIL's ``muse``) passes a check that accepts them.
    """
    from .mapper import PSALMDatasetMapper

    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty")
    if cfg.DATASETS.TRAIN_TASKS and len(cfg.DATASETS.TRAIN_TASKS) != len(names):
        raise ValueError(f"DATASETS.TRAIN_TASKS has {len(cfg.DATASETS.TRAIN_TASKS)} entries for {len(names)} data sets")
    if mapper_factory is None:
        def mapper_factory(cfg, name, task):
            return PSALMDatasetMapper(cfg, is_train=True, dataset_name=name, task=task)
    lists, mappers = [], []
    for i, name in enumerate(names):
        dicts = DatasetCatalog.get(name)
        task = _dataset_task(cfg, i, name, dicts, task_check or check_task)
        if task == "instance" and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            # Mask2Former / detectron2: instance training skips images without a non-crowd annotation
            # (the loaders keep them: evaluation needs every image)
            dicts = filter_images_with_only_crowd_annotations(dicts)
            if not dicts:
                raise ValueError(f"train data set {name!r} has no image with a non-crowd annotation")
        lists.append(dicts)
        mappers.append(mapper_factory(cfg, name, task))
        logger.info("train data set %s: task %s, %d samples", name, task, len(dicts))
    seed = cfg.SEED if cfg.SEED >= 0 else None  # None: shared random seed (detectron2 convention)
    sampler = MultiTaskBatchSampler(
        [len(d) for d in lists],
        cfg.SOLVER.IMS_PER_BATCH,
        ratios=list(cfg.DATASETS.TRAIN_RATIOS) or None,
        ratio_steps=list(cfg.DATASETS.TRAIN_RATIO_STEPS),
        ratios_after_steps=[list(r) for r in cfg.DATASETS.TRAIN_RATIOS_AFTER_STEPS],
        mode=cfg.DATALOADER.TASK_SAMPLING,
        round_robin_period=cfg.DATALOADER.ROUND_ROBIN_PERIOD,
        seed=seed,
    )
    return PSALMTrainLoader(sampler, MultiTaskDataset(lists, mappers), cfg.DATALOADER.NUM_WORKERS, names)
