"""Training engine: ``PSALMTrainer`` (detectron2 ``DefaultTrainer`` conventions), atomic and
sharding-aware checkpoints with exact resume, DDP / FSDP / ZeRO wrapping and CPU (gloo) launching, and the
one evaluation path of every tool (:mod:`.evaluation`)."""
from .defaults import default_argument_parser, train_or_evaluate
from .checkpoint import OptimizerState, PerRankState, PSALMCheckpointer, atomic_save, atomic_write_text
from .evaluation import build_test_loader, evaluate_dataset, evaluate_datasets, load_weights_for_evaluation
from .distributed import SHARDING_MODES, full_params_for_inference, launch, unwrap_model, wrap_model
from .optim import apply_trainable_patterns, build_optimizer, clip_gradients
from .rng import RNGStreams, capture_rng_state, preserve_rng_state, restore_rng_state
from .trainer import PSALMTrainer, PSALMTrainStep, resolve_amp, resolve_device

__all__ = [
    "PSALMTrainer",
    "PSALMTrainStep",
    "PSALMCheckpointer",
    "OptimizerState",
    "PerRankState",
    "atomic_save",
    "atomic_write_text",
    "SHARDING_MODES",
    "launch",
    "wrap_model",
    "unwrap_model",
    "full_params_for_inference",
    "build_optimizer",
    "apply_trainable_patterns",
    "clip_gradients",
    "RNGStreams",
    "capture_rng_state",
    "restore_rng_state",
    "preserve_rng_state",
    "resolve_amp",
    "resolve_device",
    "build_test_loader",
    "evaluate_dataset",
    "evaluate_datasets",
    "load_weights_for_evaluation",
    "default_argument_parser",
    "train_or_evaluate",
]
