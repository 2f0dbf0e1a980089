"""A tiny stand-in meta-architecture and data for engine tests (the engine must not need PSALM).

The model has a frozen ``backbone`` with dropout (it must stay in eval mode), a trunk with dropout
(draws from the torch RNG, so an inexact RNG restore changes the weights) and one head per task
(single-task batches leave the other head unused, as in PSALM).
"""
import numpy as np
import torch
from torch import nn

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY

from psalm.config import get_psalm_cfg
from psalm.data.samplers import build_psalm_train_loader
from psalm.engine import PSALMTrainer

TASKS = ("panoptic", "referring")
DIM = 8


class _StandInBase(nn.Module):
    dropout = 0.2
    keep_backbone_eval = True

    def __init__(self, cfg):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(DIM, 16), nn.Dropout(0.5))
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.trunk = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(16, 16))
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in TASKS})
        self.to(torch.device(cfg.MODEL.DEVICE))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.keep_backbone_eval:
            self.backbone.eval()
        return self

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        h = self.trunk(self.backbone(x))
        task = batch[0]["task"]
        pred = self.heads[task](h).squeeze(-1)
        if not self.training:
            return [{"pred": p} for p in pred]
        y = torch.stack([d["y"] for d in batch])
        return {"loss_fit": ((pred - y) ** 2).mean(), "loss_reg": 1e-3 * (h ** 2).mean()}


@META_ARCH_REGISTRY.register()
class EngineStandIn(_StandInBase):
    pass


@META_ARCH_REGISTRY.register()
class EngineStandInNoDropout(_StandInBase):
    dropout = 0.0


@META_ARCH_REGISTRY.register()
class EngineStandInBadTrain(_StandInBase):
    keep_backbone_eval = False


def register_standin_data(n: int = 24) -> list:
    """Two small regression data sets, one per task; returns their names."""
    names = []
    for k, task in enumerate(TASKS):
        name = f"_engine_standin_{task}"
        if name not in DatasetCatalog.list():
            def load(k=k, task=task):
                rng = np.random.default_rng(k)
                return [{"x": rng.normal(size=DIM).tolist(), "y": float(rng.normal()), "task": task, "image_id": i}
                        for i in range(n)]

            DatasetCatalog.register(name, load)
            MetadataCatalog.get(name).set(task=task)
        names.append(name)
    return names


def standin_mapper_factory(cfg, name, task):
    def mapper(d, rng=None):
        noise = 0.0 if rng is None else float(rng.normal(scale=0.01))  # per-sample randomness
        return {"x": torch.tensor(d["x"], dtype=torch.float32), "y": torch.tensor(d["y"] + noise),
                "task": task, "image_id": d["image_id"]}

    return mapper


class StandInTrainer(PSALMTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return build_psalm_train_loader(cfg, mapper_factory=standin_mapper_factory)


def standin_cfg(output_dir: str, arch: str = "EngineStandIn", **solver):
    cfg = get_psalm_cfg()
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PSALM.INIT.FROM_SCRATCH = True  # the stand-in has no pretrained weights (its backbone is frozen)
    cfg.DATASETS.TRAIN = tuple(register_standin_data())
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 0
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MAX_ITER = 12
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    cfg.SOLVER.CHECKPOINT_PERIOD = 4
    cfg.SOLVER.LOG_PERIOD = 1
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
