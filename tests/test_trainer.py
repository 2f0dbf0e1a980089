"""Training engine: exact resume, atomic checkpoints, multi-process (gloo) agreement, solver setup.

Engine tests use a tiny stand-in meta-architecture (tests/_engine_standin.py): the engine must not
depend on PSALM internals. The PSALM end-to-end checks (tiny synthetic config) are at the bottom.
"""
import json
import os

import pytest
import torch
from detectron2.utils.env import seed_all_rng

from psalm.engine import atomic_save, launch
from psalm.engine import checkpoint as ckpt_module

from ._engine_standin import StandInTrainer, flat_params, standin_cfg


class _RecordLosses:
    """Hook factory: records the un-smoothed total loss of every iteration into ``losses``."""

    @staticmethod
    def make(losses):
        from detectron2.engine import HookBase

        class Record(HookBase):
            def after_step(self):
                losses[self.trainer.iter] = self.trainer.storage.history("total_loss").latest()

        return Record()


def _train(cfg, resume=False, crash_at=None, losses=None, trainer_cls=None):
    """Build a trainer (seeded as default_setup does), optionally crash before iteration ``crash_at``.
    ``trainer_cls`` defaults to the stand-in model's trainer."""
    seed_all_rng(cfg.SEED)
    trainer = (trainer_cls or StandInTrainer)(cfg)
    trainer.resume_or_load(resume=resume)
    if losses is not None:
        trainer.register_hooks([_RecordLosses.make(losses)])
    if crash_at is not None:
        from detectron2.engine import HookBase

        class Crash(HookBase):
            def before_step(self):
                if self.trainer.iter == crash_at:
                    raise KeyboardInterrupt(f"simulated crash at iteration {crash_at}")

        trainer.register_hooks([Crash()])
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    else:
        trainer.train()
    return trainer


def _sampling_cfg(output_dir, sampling):
    cfg = standin_cfg(output_dir)
    cfg.DATALOADER.TASK_SAMPLING = sampling
    cfg.DATALOADER.ROUND_ROBIN_PERIOD = 6  # round robin: task 1 for iterations 0-5, task 2 for 6-11
    return cfg


@pytest.mark.parametrize("sampling,crash_at,last", [("random", 9, 7), ("round_robin", 5, 3)])
def test_resume_is_exact(tmp_path, sampling, crash_at, last):
    """Crash after a checkpoint, resume: same weights and losses as an uninterrupted run.

    In round-robin mode the second task's head gets its first gradient only after the resume (its
    optimiser state must then start fresh, as in the uninterrupted run)."""
    ref_losses, res_losses = {}, {}
    ref = _train(_sampling_cfg(tmp_path / "ref", sampling), losses=ref_losses)
    crashed_dir = tmp_path / "crashed"
    _train(_sampling_cfg(crashed_dir, sampling), crash_at=crash_at)
    with open(crashed_dir / "last_checkpoint") as f:
        assert f.read() == f"model_{last:07d}.pth"
    resumed = _train(_sampling_cfg(crashed_dir, sampling), resume=True, losses=res_losses)
    assert resumed.start_iter == last + 1
    torch.testing.assert_close(flat_params(resumed.model), flat_params(ref.model), rtol=0, atol=0)
    assert sorted(res_losses) == list(range(last + 1, 12))
    for it in res_losses:
        assert res_losses[it] == ref_losses[it]
    # the optimiser state continued too (AdamW moments)
    a = resumed.optimizer.state_dict()["state"]
    b = ref.optimizer.state_dict()["state"]
    for k in b:
        torch.testing.assert_close(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"], rtol=0, atol=1e-9)


def test_resume_without_rng_restore_differs(tmp_path):
    """Control: the exactness above really depends on the restored RNG state (the trunk uses dropout)."""
    ref = _train(standin_cfg(tmp_path / "ref"))
    d = tmp_path / "crashed"
    _train(standin_cfg(d), crash_at=9)
    seed_all_rng(0)
    trainer = StandInTrainer(standin_cfg(d))
    del trainer.checkpointer.checkpointables["rng"]
    trainer.resume_or_load(resume=True)
    trainer.train()
    assert not torch.allclose(flat_params(trainer.model), flat_params(ref.model), atol=1e-6)


def test_checkpoint_contents_load_weights_only(tmp_path):
    _train(standin_cfg(tmp_path, MAX_ITER=4))
    data = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert {"model", "optimizer", "trainer", "rng", "data_loader", "iteration", "world_size"} <= set(data)
    assert data["iteration"] == 3 and data["trainer"]["iteration"] == 3
    assert data["data_loader"]["iteration"] == 4  # batches consumed
    assert "LRScheduler" in data["trainer"]["hooks"]  # the scheduler state
    assert len(data["rng"]) == 1 and {"model", "data"} <= set(data["rng"][0])
    # optimiser state keyed by parameter name (portable across sharding modes)
    assert all(isinstance(k, str) and k.startswith(("trunk.", "heads.")) for k in data["optimizer"]["state"])
    assert not any(k.startswith("backbone.") for k in data["optimizer"]["state"])  # frozen: not optimised


def test_atomic_checkpoint_survives_crash_during_save(tmp_path, monkeypatch):
    trainer = _train(standin_cfg(tmp_path, MAX_ITER=4))
    ckpt = trainer.checkpointer
    ckpt.save("model_a")
    before = open(tmp_path / "model_a.pth", "rb").read()
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")  # the process dies half-way through the write
        raise OSError("disk died")

    monkeypatch.setattr(ckpt_module.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk died"):
        ckpt.save("model_a")  # overwrite the same name
    with pytest.raises(OSError, match="disk died"):
        ckpt.save("model_b")
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    assert open(tmp_path / "model_a.pth", "rb").read() == before
    assert not (tmp_path / "model_b.pth").exists()
    assert open(tmp_path / "last_checkpoint").read() == "model_a.pth"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # and it still resumes
    fresh = StandInTrainer(standin_cfg(tmp_path, MAX_ITER=4))
    fresh.resume_or_load(resume=True)
    torch.testing.assert_close(flat_params(fresh.model), flat_params(trainer.model))


def test_atomic_save_replaces(tmp_path):
    path = str(tmp_path / "x.pth")
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))


def test_frozen_backbone_stays_in_eval_mode(tmp_path):
    trainer = _train(standin_cfg(tmp_path, MAX_ITER=2))
    assert trainer.model.training and not trainer.model.backbone.training
    with pytest.raises(RuntimeError, match="frozen backbone in training mode"):
        StandInTrainer(standin_cfg(tmp_path / "bad", arch="EngineStandInBadTrain"))


def test_per_task_losses_logged(tmp_path):
    _train(standin_cfg(tmp_path, MAX_ITER=6))
    keys = set()
    with open(tmp_path / "metrics.json") as f:
        for line in f:
            keys |= set(json.loads(line))
    assert {"total_loss", "lr", "panoptic/total_loss", "referring/total_loss", "panoptic/loss_fit",
            "referring/loss_reg"} <= keys
    assert any(p.startswith("events.out.tfevents") for p in os.listdir(tmp_path))


def test_solver_adamw_cosine_warmup_and_clipping(tmp_path):
    cfg = standin_cfg(tmp_path, MAX_ITER=10, WARMUP_ITERS=4, BASE_LR=0.1)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1e-3
    trainer = _train(cfg)
    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["weight_decay"] == 0.0 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    lrs, norms = {}, {}
    with open(tmp_path / "metrics.json") as f:
        for line in f:
            rec = json.loads(line)
            lrs[rec["iteration"]] = rec.get("lr", lrs.get(rec["iteration"]))
            if "grad_norm" in rec:
                norms[rec["iteration"]] = rec["grad_norm"]
    assert lrs[0] == pytest.approx(0.1 * 0.001)  # WARMUP_FACTOR
    assert lrs[4] == pytest.approx(0.1 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.4)).item()), rel=1e-5)
    assert lrs[2] < lrs[4] and lrs[9] < lrs[5]
    assert norms and all(n > 1e-3 for n in norms.values())  # the norm BEFORE clipping is logged


def test_clip_gradients_full_model_and_value():
    from psalm.engine import clip_gradients
    from psalm.config import get_psalm_cfg

    clip = get_psalm_cfg().SOLVER.CLIP_GRADIENTS
    clip.ENABLED, clip.CLIP_VALUE = True, 0.5
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.full((3,), 2.0), torch.full((4,), -1.0)
    norm = clip_gradients(clip, params)
    assert norm.item() == pytest.approx((12 + 4) ** 0.5)
    assert torch.cat([p.grad for p in params]).norm().item() == pytest.approx(0.5, rel=1e-5)
    clip.CLIP_TYPE = "value"
    params[0].grad = torch.full((3,), 2.0)
    assert clip_gradients(clip, params) is None and params[0].grad.max().item() == 0.5
    clip.CLIP_TYPE = "global"
    with pytest.raises(ValueError, match="CLIP_TYPE"):
        clip_gradients(clip, params)


@pytest.mark.parametrize("name", ["ADAMW", "SGD"])
def test_optimizer_impls_give_the_same_update(name):
    """SOLVER.OPTIMIZER_IMPL only picks torch's kernel: fused, foreach and the per-tensor loop agree."""
    from psalm.config import get_psalm_cfg
    from psalm.engine.optim import build_optimizer

    results = {}
    for impl in ("auto", "fused", "foreach", "for_loop"):
        cfg = get_psalm_cfg()
        cfg.SOLVER.OPTIMIZER, cfg.SOLVER.OPTIMIZER_IMPL, cfg.SOLVER.BASE_LR = name, impl, 0.05
        cfg.SOLVER.MOMENTUM = 0.9
        model = _small_model()
        opt = build_optimizer(cfg, model)
        expected_fused = impl in ("auto", "fused")
        assert bool(opt.defaults.get("fused")) == expected_fused
        assert bool(opt.defaults.get("foreach")) == (impl == "foreach")
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        results[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (results["for_loop"] - torch.cat([p.detach().flatten() for p in _small_model().parameters()])).abs().max()
    assert moved > 1e-3  # the steps did change the weights
    for impl in ("auto", "fused", "foreach"):
        torch.testing.assert_close(results[impl], results["for_loop"], rtol=1e-5, atol=1e-6)
    cfg.SOLVER.OPTIMIZER_IMPL = "apex"
    with pytest.raises(ValueError, match="OPTIMIZER_IMPL"):
        build_optimizer(cfg, model)


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 2))


def test_trainable_parameter_patterns(tmp_path):
    cfg = standin_cfg(tmp_path, MAX_ITER=1)
    cfg.SOLVER.TRAINABLE_PARAMETERS = ["heads.*"]
    trainer = _train(cfg)
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("heads.") for n in names)
    cfg.SOLVER.TRAINABLE_PARAMETERS = ["head.*"]  # typo: must not silently freeze everything
    with pytest.raises(ValueError, match="matches no parameter"):
        StandInTrainer(cfg)


def test_bad_sharding_mode_is_an_error(tmp_path):
    cfg = standin_cfg(tmp_path)
    cfg.SOLVER.SHARDING = "deepspeed"
    from psalm.engine import wrap_model

    with pytest.raises(ValueError, match="SOLVER.SHARDING"):
        wrap_model(cfg, torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- 2 processes (gloo)
def _two_rank_job(out_dir, modes):
    """Runs in each of 2 gloo processes: 3 iterations per sharding mode, full weights + grads saved."""
    from detectron2.utils import comm

    for mode in modes:
        cfg = standin_cfg(os.path.join(out_dir, mode), arch="EngineStandInNoDropout", MAX_ITER=3,
                          CHECKPOINT_PERIOD=0, SHARDING=mode)
        seed_all_rng(0)  # same init on every rank (DDP would broadcast anyway; FSDP shards rank 0's)
        trainer = StandInTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        sd = trainer.checkpointer.model_state_dict()  # full (gathered) weights on rank 0
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in trainer.model.named_parameters() if p.grad is not None}
        # inference with UNEVEN numbers of batches per rank (as inference_on_dataset's shards):
        # under FSDP this only works with the full parameters gathered first
        from psalm.engine import full_params_for_inference

        trainer.model.eval()
        with torch.no_grad(), full_params_for_inference(trainer.model):
            preds = torch.stack([trainer.model([{"x": torch.full((8,), 0.1 * i), "task": "panoptic"}])[0]["pred"]
                                 for i in range(3 - comm.get_rank())])
        torch.save({"local_params": {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                                     for n, p in trainer.model.named_parameters()},
                    "grads": grads, "full": sd, "preds": preds},
                   os.path.join(out_dir, f"{mode}_rank{comm.get_rank()}.pt"))


def _check_two_processes(tmp_path, modes):
    launch(_two_rank_job, 2, args=(str(tmp_path), modes))
    seed_all_rng(0)
    ref = _train(standin_cfg(tmp_path / "single", arch="EngineStandInNoDropout", MAX_ITER=3, CHECKPOINT_PERIOD=0))
    ref_params = dict(ref.model.named_parameters())
    for mode in modes:
        r0 = torch.load(tmp_path / f"{mode}_rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{mode}_rank1.pt", weights_only=True)
        for name, p in r0["local_params"].items():
            key = name.removeprefix("module.")
            torch.testing.assert_close(p, r1["local_params"][name], rtol=0, atol=0, msg=f"{mode}: {name} differs")
            torch.testing.assert_close(p, ref_params[key].detach(), rtol=1e-5, atol=1e-6, msg=f"{mode} vs 1 proc: {key}")
        for name, g in r0["grads"].items():
            torch.testing.assert_close(g, r1["grads"][name], rtol=0, atol=0, msg=f"{mode}: grad {name} differs")
        assert set(r0["full"]) == set(ref.model.state_dict()) and r1["full"] == {}
        ref.model.eval()
        with torch.no_grad():
            ref_preds = torch.stack([ref.model([{"x": torch.full((8,), 0.1 * i), "task": "panoptic"}])[0]["pred"]
                                     for i in range(3)])
        torch.testing.assert_close(r0["preds"], ref_preds, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1["preds"], ref_preds[:2], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_gloo_ddp(tmp_path):
    """2 CPU processes (gloo), DDP: weights and gradients agree across ranks and equal a 1-process run.

    Slow only because each spawned process imports torch + detectron2 (~5 s)."""
    _check_two_processes(tmp_path, ("ddp",))


@pytest.mark.slow
def test_two_processes_gloo_all_sharding_modes(tmp_path):
    """The same for DDP, ZeRO (sharded optimiser states) and FSDP (sharded everything)."""
    _check_two_processes(tmp_path, ("ddp", "zero", "fsdp"))


# ----------------------------------------------------------------------------- the real PSALM (tiny)
def _psalm_cfg(tmp_path, out="out", **solver):
    from psalm.config import get_psalm_cfg
    from psalm.data.datasets.synthetic import prepare_synthetic_for_cfg

    from .conftest import REPO_ROOT

    data = tmp_path / "data"
    cfg = get_psalm_cfg(str(REPO_ROOT / "configs/tiny/psalm_synthetic.yaml"), [
        "DATASETS.SYNTHETIC.ROOT", str(data), "DATASETS.SYNTHETIC.NUM_TRAIN", "8", "DATASETS.SYNTHETIC.NUM_VAL", "2",
        "MODEL.PSALM.TOKENIZER", str(data / "tokenizer"), "DATASETS.TEST", "()", "DATASETS.TEST_TASKS", "[]",
        "OUTPUT_DIR", str(tmp_path / out), "SOLVER.LOG_PERIOD", "1", "SOLVER.WARMUP_ITERS", "1",
        # the compiled deformable-attention kernel's CPU backward accumulates with atomics (two
        # identical runs differ at ~1e-7); the PyTorch reference is bitwise deterministic
        "MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL", "pytorch",
    ])
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    prepare_synthetic_for_cfg(cfg)
    return cfg


def _psalm_train(cfg, **kwargs):
    from psalm.engine import PSALMTrainer

    return _train(cfg, trainer_cls=PSALMTrainer, **kwargs)


def test_psalm_tiny_trains_every_task_with_frozen_backbone_in_eval(tmp_path):
    cfg = _psalm_cfg(tmp_path, MAX_ITER=4, CHECKPOINT_PERIOD=0)
    cfg.MODEL.PSALM.FREEZE_BACKBONE = True
    cfg.DATASETS.TRAIN_RATIOS = [1.0, 1.0, 1.0, 1.0]
    trainer = _psalm_train(cfg)
    assert trainer.model.training and not trainer.model.backbone.training
    assert not any(p.requires_grad for p in trainer.model.backbone.parameters())
    keys = set()
    with open(tmp_path / "out" / "metrics.json") as f:
        for line in f:
            keys |= set(json.loads(line))
    tasks = {k.split("/")[0] for k in keys if k.endswith("/total_loss")}
    assert tasks and tasks <= {"panoptic", "referring", "gres", "interactive"}
    assert any(k.endswith("/loss_mask") for k in keys) and any(k.endswith("/loss_dice") for k in keys)


@pytest.fixture
def one_thread():
    """Bitwise reproducibility needs one intra-op thread: with 2, some CPU kernels of the model reduce
    in a varying order and two identical runs already differ (~1e-8 relative) from iteration 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_psalm_tiny_resume_is_exact(tmp_path, one_thread):
    """The real tiny PSALM: crash after the checkpoint of iteration 3, resume, same weights as no crash."""
    ref_losses, res_losses = {}, {}
    ref = _psalm_train(_psalm_cfg(tmp_path, "ref", MAX_ITER=7, CHECKPOINT_PERIOD=4), losses=ref_losses)
    _psalm_train(_psalm_cfg(tmp_path, "crash", MAX_ITER=7, CHECKPOINT_PERIOD=4), crash_at=5)
    resumed = _psalm_train(_psalm_cfg(tmp_path, "crash", MAX_ITER=7, CHECKPOINT_PERIOD=4), resume=True,
                           losses=res_losses)
    assert resumed.start_iter == 4 and sorted(res_losses) == [4, 5, 6]
    for it in (4, 5, 6):
        assert res_losses[it] == ref_losses[it]
    torch.testing.assert_close(flat_params(resumed.model), flat_params(ref.model), rtol=0, atol=0)


@pytest.mark.slow
def test_train_net_killed_then_resumed_matches_uninterrupted(tmp_path):
    """tools/train_net.py in a subprocess, SIGKILLed right after a checkpoint, then --resume."""
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO_ROOT

    data = tmp_path / "data"
    common = [sys.executable, str(REPO_ROOT / "tools/train_net.py"), "--config-file",
              str(REPO_ROOT / "configs/tiny/psalm_synthetic.yaml")]
    opts = ["DATASETS.SYNTHETIC.ROOT", str(data), "DATASETS.SYNTHETIC.NUM_TRAIN", "8",
            "DATASETS.SYNTHETIC.NUM_VAL", "2", "MODEL.PSALM.TOKENIZER", str(data / "tokenizer"),
            "DATASETS.TEST", "()", "DATASETS.TEST_TASKS", "[]", "SOLVER.MAX_ITER", "30",
            "SOLVER.CHECKPOINT_PERIOD", "10", "SOLVER.WARMUP_ITERS", "2",
            "MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL", "pytorch"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(common + opts + ["OUTPUT_DIR", str(tmp_path / "ref")], check=True, env=env, cwd=REPO_ROOT,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(common + opts + ["OUTPUT_DIR", str(out)], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "model_0000009.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "model_0000009.pth").exists() and not (out / "model_final.pth").exists()
    subprocess.run(common + ["--resume"] + opts + ["OUTPUT_DIR", str(out)], check=True, env=env, cwd=REPO_ROOT,
                   capture_output=True)
    a = torch.load(tmp_path / "ref" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_stage1_only_the_projector_trains(tmp_path):
    """Stage-1 settings (configs/stage1) on the synthetic captions: only ``projector.*`` changes."""
    from .conftest import REPO_ROOT
    from psalm.config import get_psalm_cfg

    stage1 = get_psalm_cfg(str(REPO_ROOT / "configs/stage1/psalm_stage1_projector.yaml"))
    cfg = _psalm_cfg(tmp_path, MAX_ITER=2, CHECKPOINT_PERIOD=0)
    cfg.DATASETS.TRAIN = ("psalm_synthetic_train_caption",)
    cfg.DATASETS.TRAIN_TASKS = list(stage1.DATASETS.TRAIN_TASKS)
    cfg.DATASETS.TRAIN_RATIOS = [1.0]
    cfg.SOLVER.TRAINABLE_PARAMETERS = list(stage1.SOLVER.TRAINABLE_PARAMETERS)
    cfg.SOLVER.BASE_LR = 1e-2
    cfg.MODEL.PSALM.FREEZE_BACKBONE = True
    seed_all_rng(0)
    from psalm.engine import PSALMTrainer

    before = {k: v.clone() for k, v in PSALMTrainer.build_model(cfg).state_dict().items()}
    trainer = _psalm_train(cfg)
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed), sorted(changed)[:5]
    assert any(k.endswith("weight") for k in changed)


# ----------------------------------------------------------------------------- resume at scale
def test_checkpoint_max_to_keep_default_keeps_a_few():
    from psalm.config import get_psalm_cfg

    assert 1 <= get_psalm_cfg().SOLVER.CHECKPOINT_MAX_TO_KEEP <= 3


def test_pruning_survives_a_resume(tmp_path):
    """Files written before a resume count towards CHECKPOINT_MAX_TO_KEEP and are pruned too."""
    cfg = standin_cfg(tmp_path, CHECKPOINT_PERIOD=2, CHECKPOINT_MAX_TO_KEEP=0, MAX_ITER=12)
    _train(cfg, crash_at=7)
    periodic = sorted(p.name for p in tmp_path.glob("model_0*.pth"))
    assert periodic == ["model_0000001.pth", "model_0000003.pth", "model_0000005.pth"]
    cfg = standin_cfg(tmp_path, CHECKPOINT_PERIOD=2, CHECKPOINT_MAX_TO_KEEP=2, MAX_ITER=12)
    resumed = _train(cfg, resume=True)
    assert resumed.start_iter == 6
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == [
        "model_0000007.pth", "model_0000009.pth", "model_final.pth"]


_RSS_SCRIPT = r"""
import sys, torch
from psalm.engine import PSALMCheckpointer

def rss_anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

ckpt = PSALMCheckpointer(torch.nn.Linear(1, 1))
before = rss_anon_kb()
loaded = ckpt._load_file(sys.argv[1])
total = sum(float(v.sum()) for v in loaded["model"].values())  # touch every page
print(rss_anon_kb() - before)
"""


def test_resume_loads_checkpoints_memory_mapped(tmp_path):
    """Loading a checkpoint does not copy it into the process's own (anonymous) memory: the tensors are
    memory-mapped from the file, so the ranks of a node share one copy in the page cache."""
    import subprocess
    import sys

    n_mb = 96
    torch.save({"model": {f"w{i}": torch.ones(n_mb // 8, 1024 * 256) for i in range(8)}}, tmp_path / "big.pth")
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big.pth")], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mb = int(proc.stdout.split()[-1]) / 1024
    assert grown_mb < n_mb / 4, f"loading a {n_mb} MB checkpoint grew the anonymous memory by {grown_mb:.0f} MB"


def _two_rank_resume_job(out_dir, modes):
    """Each of 2 gloo processes: a run of 4 iterations crashes after the checkpoint of iteration 1; a second
    trainer resumes from it (memory-mapped) and finishes."""
    from detectron2.utils import comm

    from detectron2.engine import HookBase

    class Crash(HookBase):
        def before_step(self):
            if self.trainer.iter == 2:
                raise KeyboardInterrupt("simulated crash at iteration 2")

    for mode in modes:
        kwargs = dict(arch="EngineStandInNoDropout", CHECKPOINT_PERIOD=2, MAX_ITER=4, SHARDING=mode)
        seed_all_rng(0)
        first = StandInTrainer(standin_cfg(os.path.join(out_dir, mode), **kwargs))
        first.resume_or_load(resume=False)
        first.register_hooks([Crash()])
        try:
            first.train()
        except KeyboardInterrupt:
            pass
        seed_all_rng(123)  # a different init: what continues must come from the checkpoint
        resumed = StandInTrainer(standin_cfg(os.path.join(out_dir, mode), **kwargs))
        resumed.resume_or_load(resume=True)
        assert resumed.start_iter == 2
        resumed.train()
        sd = resumed.checkpointer.model_state_dict()
        if comm.is_main_process():
            torch.save(sd, os.path.join(out_dir, f"{mode}_resumed.pt"))


@pytest.mark.slow
def test_two_processes_gloo_resume_matches_uninterrupted(tmp_path):
    """2 gloo processes resume under DDP and FSDP from the (memory-mapped) checkpoint and end where one
    uninterrupted 4-iteration run ends."""
    modes = ("ddp", "fsdp")
    launch(_two_rank_resume_job, 2, args=(str(tmp_path), modes))
    seed_all_rng(0)
    ref = _train(standin_cfg(tmp_path / "single", arch="EngineStandInNoDropout", MAX_ITER=4, CHECKPOINT_PERIOD=2))
    ref_sd = ref.model.state_dict()
    for mode in modes:
        got = torch.load(tmp_path / f"{mode}_resumed.pt", weights_only=True)
        assert set(got) == set(ref_sd)
        for k, v in ref_sd.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"{mode}: {k}")
