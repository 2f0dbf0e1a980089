"""MultiTaskBatchSampler / build_psalm_train_loader: ratios, rank agreement, single-task batches,
exact resume, round-robin, ratio steps."""
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


def test_single_phase_draws_are_those_of_rng_choice():
    """The inverse-CDF draw reproduces ``Generator.choice(T, p=...)``: runs started before ratio steps
    existed resume onto the same task sequence."""
    ratios = [2.0, 2.0, 1.0, 1.0]
    sampler = MultiTaskBatchSampler([5] * 4, 2, ratios=ratios, seed=7, rank=0, world_size=1)
    for block in (0, 1):
        expected = np.random.default_rng([7, 0, block]).choice(4, size=4096, p=np.asarray(ratios) / sum(ratios))
        got = [sampler.dataset_at(t) for t in range(block * 4096, (block + 1) * 4096)]
        assert got == expected.tolist()


def test_ratio_steps_change_the_mixture():
    kw = dict(dataset_sizes=[10, 10, 10], batch_size=2, ratios=[0, 1, 0], ratio_steps=[300, 5000],
              ratios_after_steps=[[1, 1, 2], [1, 0, 0]], seed=4, rank=0, world_size=1)
    sampler = MultiTaskBatchSampler(**kw)
    draws = np.array([sampler.dataset_at(t) for t in range(6000)])
    assert set(draws[:300].tolist()) == {1}
    freq = np.bincount(draws[300:5000], minlength=3) / (5000 - 300)
    np.testing.assert_allclose(freq, [0.25, 0.25, 0.5], atol=0.025)  # across the block boundary at 4096
    assert set(draws[5000:].tolist()) == {0}
    # resuming across a step continues exactly; the steps are part of the resume fingerprint
    full = _take(MultiTaskBatchSampler(**kw), 320)
    resumed = MultiTaskBatchSampler(**kw)
    resumed.load_state_dict(MultiTaskBatchSampler(**kw).state_dict(iteration=290))
    assert _take(resumed, 30) == full[290:]
    other = MultiTaskBatchSampler(**dict(kw, ratio_steps=[200, 5000]))
    with pytest.raises(ValueError, match="settings differ"):
        other.load_state_dict(MultiTaskBatchSampler(**kw).state_dict(iteration=290))


def test_round_robin_cycle_restarts_at_a_ratio_step():
    sampler = MultiTaskBatchSampler([5, 5], 1, ratios=[1, 1], ratio_steps=[5], ratios_after_steps=[[2, 1]],
                                    mode="round_robin", round_robin_period=1, seed=0, rank=0, world_size=1)
    assert [sampler.dataset_at(t) for t in range(11)] == [0, 1, 0, 1, 0] + [0, 0, 1, 0, 0, 1]


def test_bad_ratio_steps_raise():
    with pytest.raises(ValueError, match="one list per step"):
        MultiTaskBatchSampler([5, 5], 2, ratio_steps=[10], rank=0, world_size=1)
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiTaskBatchSampler([5, 5], 2, ratio_steps=[10, 10], ratios_after_steps=[[1, 1], [1, 1]],
                              rank=0, world_size=1)
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiTaskBatchSampler([5, 5], 2, ratio_steps=[0], ratios_after_steps=[[1, 1]], rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"TRAIN_RATIOS_AFTER_STEPS\[0\]"):
        MultiTaskBatchSampler([5, 5], 2, ratio_steps=[10], ratios_after_steps=[[1]], rank=0, world_size=1)
    with pytest.raises(ValueError, match="positive sum"):
        MultiTaskBatchSampler([5, 5], 2, ratio_steps=[10], ratios_after_steps=[[0, 0]], rank=0, world_size=1)


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
    cfg.DATASETS.TRAIN_RATIO_STEPS = [20]
    cfg.DATASETS.TRAIN_RATIOS_AFTER_STEPS = [[0.0, 1.0]]
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
    assert {b[0]["task"] for b in batches[:20]} == {"referring", "panoptic"}
    assert {b[0]["task"] for b in batches[20:]} == {"panoptic"}  # DATASETS.TRAIN_RATIO_STEPS
    state = loader.state_dict()
    assert state["iteration"] == 30  # counts the batches taken by the consumer
    more = [next(it) for _ in range(5)]

    resumed = build_psalm_train_loader(cfg, mapper_factory=factory)
    resumed.load_state_dict(state)
    assert list(itertools.islice(iter(resumed), 5)) == more  # same samples and same mapper randomness
