"""MultiTaskBatchSampler / build_psalm_train_loader: ratios, rank agreement, single-task batches,
exact resume, round-robin."""
import itertools

import numpy as np
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from psalm.config import get_psalm_cfg
from psalm.data.samplers import MultiTaskBatchSampler, build_psalm_train_loader


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ratios_over_many_draws():
    sampler = MultiTaskBatchSampler([10, 20, 30], batch_size=2, ratios=[1, 2, 1], seed=0, rank=0, world_size=1)
    draws = np.array([sampler.dataset_at(t) for t in range(20000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.25, 0.5, 0.25], atol=0.015)
    zero = MultiTaskBatchSampler([10, 20], batch_size=2, ratios=[0, 1], seed=0, rank=0, world_size=1)
    assert {zero.dataset_at(t) for t in range(500)} == {1}


def test_identical_across_ranks_and_single_task_batches():
    world, global_bs = 4, 8
    ranks = [MultiTaskBatchSampler([13, 7, 29], global_bs, seed=5, rank=r, world_size=world) for r in range(world)]
    batches = [_take(s, 50) for s in ranks]
    for t in range(50):
        per_rank = [batches[r][t] for r in range(world)]
        assert all(len(b) == global_bs // world for b in per_rank)
        datasets = {ref[0] for b in per_rank for ref in b}
        assert len(datasets) == 1  # every rank, every sample: the same single task
        seeds = [ref[2] for b in per_rank for ref in b]
        assert len(set(seeds)) == global_bs  # every sample gets its own mapper seed
    # the ranks together draw exactly what a single process with the global batch draws
    single = _take(MultiTaskBatchSampler([13, 7, 29], global_bs, seed=5, rank=0, world_size=1), 50)
    for t in range(50):
        assert [ref for r in range(world) for ref in batches[r][t]] == single[t]


def test_each_pass_is_a_permutation():
    sampler = MultiTaskBatchSampler([6], batch_size=3, seed=1, rank=0, world_size=1)
    draws = [ref[1] for b in _take(sampler, 4) for ref in b]
    assert sorted(draws[:6]) == list(range(6)) and sorted(draws[6:]) == list(range(6))
    assert draws[:6] != draws[6:]  # a fresh order every pass (seeded)


@pytest.mark.parametrize("mode", ["random", "round_robin"])
def test_resume_gives_the_same_continuation(mode):
    kw = dict(dataset_sizes=[5, 9, 4], batch_size=4, mode=mode, round_robin_period=3, seed=11, rank=1, world_size=2)
    full = _take(MultiTaskBatchSampler(**kw), 40)
    first = MultiTaskBatchSampler(**kw)
    state = first.state_dict(iteration=23)
    resumed = MultiTaskBatchSampler(**kw)
    resumed.load_state_dict(state)
    assert _take(resumed, 17) == full[23:]
    other = MultiTaskBatchSampler(**dict(kw, seed=12))
    with pytest.raises(ValueError, match="settings differ"):
        other.load_state_dict(state)


def test_random_seed_is_adopted_on_resume():
    a = MultiTaskBatchSampler([5, 5], 2, seed=None, rank=0, world_size=1)
    full = _take(a, 10)
    b = MultiTaskBatchSampler([5, 5], 2, seed=None, rank=0, world_size=1)
    b.load_state_dict(a.state_dict(iteration=4))
    assert _take(b, 6) == full[4:]


def test_round_robin_period_and_integer_ratios():
    sampler = MultiTaskBatchSampler([5, 5, 5], 1, ratios=[1, 2, 1], mode="round_robin", round_robin_period=3,
                                    seed=0, rank=0, world_size=1)
    pattern = [sampler.dataset_at(t) for t in range(24)]
    assert pattern == ([0] * 3 + [1] * 6 + [2] * 3) * 2
    with pytest.raises(ValueError, match="integer ratios"):
        MultiTaskBatchSampler([5, 5], 1, ratios=[1, 1.5], mode="round_robin", rank=0, world_size=1)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="ratios for"):
        MultiTaskBatchSampler([5, 5], 2, ratios=[1], rank=0, world_size=1)
    with pytest.raises(ValueError, match="multiple of world size"):
        MultiTaskBatchSampler([5], 3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        MultiTaskBatchSampler([5, 0], 2, rank=0, world_size=1)
    with pytest.raises(ValueError, match="TASK_SAMPLING"):
        MultiTaskBatchSampler([5], 2, mode="sequential", rank=0, world_size=1)


def _register(name, n, task):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [{"idx": i, "task": task, "name": name} for i in range(n)])
    MetadataCatalog.get(name).set(task=task)


def test_build_loader_single_task_batches_and_resume():
    _register("_psalm_test_ref", 7, "referring")
    _register("_psalm_test_pan", 11, "panoptic")
    cfg = get_psalm_cfg()
    cfg.DATASETS.TRAIN = ("_psalm_test_ref", "_psalm_test_pan")
    cfg.DATASETS.TRAIN_RATIOS = [1.0, 3.0]
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 3

    def factory(cfg, name, task):
        def mapper(d, rng=None):
            return {"name": d["name"], "idx": d["idx"], "task": task, "draw": int(rng.integers(1 << 30))}
        return mapper

    loader = build_psalm_train_loader(cfg, mapper_factory=factory)
    it = iter(loader)
    batches = [next(it) for _ in range(30)]
    for b in batches:
        assert len(b) == 4 and len({s["task"] for s in b}) == 1 and len({s["name"] for s in b}) == 1
    assert {b[0]["task"] for b in batches} == {"referring", "panoptic"}
    state = loader.state_dict()
    assert state["iteration"] == 30  # counts the batches taken by the consumer
    more = [next(it) for _ in range(5)]

    resumed = build_psalm_train_loader(cfg, mapper_factory=factory)
    resumed.load_state_dict(state)
    assert list(itertools.islice(iter(resumed), 5)) == more  # same samples and same mapper randomness
