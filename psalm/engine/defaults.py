"""What every ``train_net.py`` (psalm's and each project's) shares (detectron2's ``engine/defaults.py`` role).

* :func:`default_argument_parser`: detectron2's parser (``--config-file``, ``--num-gpus``, ``--eval-only``,
  ``--resume``, ...) plus ``--allow-missing-keys`` for ``--eval-only``.
* :func:`train_or_evaluate`: ``--eval-only`` (build the model, load the weights with psalm's one
  evaluation policy, :func:`psalm.engine.evaluation.load_weights_for_evaluation`, test, write
  ``results.json``) or train (resume or initial weights, train, write ``results.json``), for any
  :class:`~psalm.engine.PSALMTrainer` subclass.

A project's trainer says where its weights come from through two hooks of :class:`PSALMTrainer`:
``prebuilt_weight_sources(cfg)`` (state-dict prefixes whose weights the model already holds when built,
for the strict initial-weights plan) and ``weights_loaded_at_build(cfg)`` (the whole model's weights
were loaded when it was built, e.g. a converted release directory: ``--eval-only`` then needs no
``MODEL.WEIGHTS``).
"""
from __future__ import annotations

import logging

from detectron2.engine import default_argument_parser as _d2_default_argument_parser

from .checkpoint import PSALMCheckpointer
from .evaluation import ALLOW_MISSING_FLAG, load_weights_for_evaluation, write_results

__all__ = ["default_argument_parser", "train_or_evaluate"]

logger = logging.getLogger(__name__)


def default_argument_parser(epilog: str | None = None):
    """detectron2's ``default_argument_parser`` plus ``--allow-missing-keys`` (for ``--eval-only``)."""
    parser = _d2_default_argument_parser(epilog)
    parser.add_argument(ALLOW_MISSING_FLAG, dest="allow_missing_keys", action="store_true",
                        help="--eval-only: evaluate even if MODEL.WEIGHTS is empty or leaves model tensors missing "
                             "(they keep their random initialisation; the metrics are then meaningless)")
    return parser


def train_or_evaluate(trainer_cls, cfg, args):
    """Run ``args.eval_only`` evaluation or training with ``trainer_cls``; returns the results (also written
    to ``OUTPUT_DIR/results.json``).

    Evaluation loads, in order of precedence: the last checkpoint of ``OUTPUT_DIR`` (``--resume``), else
    ``MODEL.WEIGHTS``; an empty choice or a checkpoint that leaves model tensors missing is an error unless
    ``--allow-missing-keys``, except for a model whose weights were all loaded when it was built
    (``trainer_cls.weights_loaded_at_build(cfg)``), which is evaluated as built when nothing else is given.
    """
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        checkpointer = PSALMCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        resume = getattr(args, "resume", False)
        path = checkpointer.get_checkpoint_file() if resume and checkpointer.has_checkpoint() else cfg.MODEL.WEIGHTS
        built = trainer_cls.weights_loaded_at_build(cfg)
        if path or not built:
            load_weights_for_evaluation(model, path, allow_missing=getattr(args, "allow_missing_keys", False))
        else:
            logger.info("evaluating the weights loaded when the model was built: %s", built)
        results = trainer_cls.test(cfg, model)
    else:
        trainer = trainer_cls(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    write_results(cfg, results)
    return results
