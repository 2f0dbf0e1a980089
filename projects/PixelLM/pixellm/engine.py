"""``PixelLMTrainer``: psalm's trainer (checkpointing, RNG streams, AMP, clipping, hooks, DDP) with
PixelLM's model, data loader and evaluation.

* model: detectron2 ``build_model`` (``MODEL.META_ARCHITECTURE: "PixelLM"``), weights from
  ``MODEL.PIXELLM.MODEL_DIR`` at build time (strict) or random with ``ALLOW_RANDOM_INIT``;
* data: ``DATASETS.TRAIN`` mixed with ``DATASETS.TRAIN_RATIOS`` (:class:`PixelLMTrainLoader`),
  mapped by :class:`PixelLMDatasetMapper`;
* evaluation: every ``DATASETS.TEST`` entry with :class:`pixellm.evaluation.MuseEvaluator`.
"""
from __future__ import annotations

import logging
import os

from detectron2.data import DatasetCatalog

from psalm.engine import PSALMTrainer

__all__ = ["PixelLMTrainer", "prepare_pixellm_data_for_cfg", "build_mapper"]

logger = logging.getLogger(__name__)


def prepare_pixellm_data_for_cfg(cfg) -> None:
    """Register the project's data sets (synthetic MUSE with the config's scene spec) and psalm's
    (``psalm_synthetic_*`` generated and registered with the config's root and spec when used), and
    write the tiny tokenizer at ``MODEL.PIXELLM.TOKENIZER`` when the config uses synthetic data and it
    is missing."""
    from psalm.data.datasets.synthetic import synthetic_spec_from_cfg

    from .data.datasets import register_pixellm_datasets, register_synthetic_muse, save_tiny_pixellm_tokenizer

    register_pixellm_datasets()
    import psalm.data.datasets  # noqa: F401  (registers psalm's data sets: referring / semantic members)
    from psalm.data.datasets.synthetic import prepare_synthetic_for_cfg

    prepare_synthetic_for_cfg(cfg)  # psalm_synthetic_* members with the config's root and scene spec
    names = [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]
    if any(n.startswith("pixellm_synthetic_muse") for n in names):
        root = os.path.join(cfg.DATASETS.SYNTHETIC.ROOT, "pixellm_muse") if cfg.DATASETS.SYNTHETIC.ROOT else None
        register_synthetic_muse(root=root, spec=synthetic_spec_from_cfg(cfg),
                                answer_style=cfg.DATASETS.PIXELLM_SYNTHETIC_MUSE.ANSWER_STYLE)
        tok = cfg.MODEL.PIXELLM.TOKENIZER
        if tok and not os.path.isfile(os.path.join(tok, "tokenizer_config.json")):
            save_tiny_pixellm_tokenizer(tok)


def build_mapper(cfg, tokenizer, is_train: bool):
    from .data.mapper import PixelLMDatasetMapper

    p = cfg.MODEL.PIXELLM
    n = p.CODEBOOK.TOKENS_PER_SCALE * p.CODEBOOK.SCALES
    return PixelLMDatasetMapper(tokenizer, p.VISION.IMAGE_SIZE if not p.MODEL_DIR else _model_image_size(p.MODEL_DIR),
                                n, is_train=is_train, max_length=p.MODEL_MAX_LENGTH, pixel_mean=p.PIXEL_MEAN,
                                pixel_std=p.PIXEL_STD)


def _model_image_size(model_dir) -> int:
    from .modeling.build import load_spec

    return int(load_spec(model_dir)["vision"]["image_size"])


class PixelLMTrainer(PSALMTrainer):
    @classmethod
    def build_model(cls, cfg):
        import pixellm.modeling  # noqa: F401  (registers "PixelLM")

        if cfg.MODEL.META_ARCHITECTURE != "PixelLM":
            raise ValueError(f"MODEL.META_ARCHITECTURE must be 'PixelLM' for this trainer, got "
                             f"{cfg.MODEL.META_ARCHITECTURE!r}")
        model = super().build_model(cfg)
        return model.to(cfg.MODEL.DEVICE)

    @classmethod
    def weights_loaded_at_build(cls, cfg) -> str:
        """A converted release (``MODEL.PIXELLM.MODEL_DIR``) is loaded, strictly, when the model is built:
        ``--eval-only`` evaluates it as built when no ``MODEL.WEIGHTS`` is given."""
        d = cfg.MODEL.PIXELLM.MODEL_DIR
        return f"MODEL.PIXELLM.MODEL_DIR ({d})" if d else ""

    @classmethod
    def initialize_weights(cls, cfg, model):
        """The weights were loaded (strictly) when the model was built from ``MODEL.PIXELLM.MODEL_DIR``,
        or are random by ``MODEL.PIXELLM.ALLOW_RANDOM_INIT``; ``MODEL.WEIGHTS`` (a checkpoint of this
        trainer) is loaded on top when given."""
        if cfg.MODEL.WEIGHTS:
            from psalm.engine.checkpoint import load_model_weights

            load_model_weights(model, cfg.MODEL.WEIGHTS)
        logger.info("PixelLM initial weights: %s%s", cfg.MODEL.PIXELLM.MODEL_DIR or "random (ALLOW_RANDOM_INIT)",
                    f" + {cfg.MODEL.WEIGHTS}" if cfg.MODEL.WEIGHTS else "")
        return None

    @classmethod
    def build_train_loader(cls, cfg):
        from .data.datasets import PixelLMTrainLoader, training_items
        from .modeling.tokenizer import load_pixellm_tokenizer

        prepare_pixellm_data_for_cfg(cfg)
        tokenizer = load_pixellm_tokenizer(cfg.MODEL.PIXELLM.TOKENIZER or cfg.MODEL.PIXELLM.MODEL_DIR)
        names = list(cfg.DATASETS.TRAIN)
        ratios = list(cfg.DATASETS.TRAIN_RATIOS) or [1.0] * len(names)
        datasets = [training_items(DatasetCatalog.get(n), n) for n in names]
        from detectron2.utils import comm

        ims = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        return PixelLMTrainLoader(datasets, ratios, build_mapper(cfg, tokenizer, True), ims,
                                  seed=(cfg.SEED if cfg.SEED >= 0 else 0) * 1000 + comm.get_rank())

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        from .evaluation import evaluate_pixellm

        return evaluate_pixellm(cfg, model)
