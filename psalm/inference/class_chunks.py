"""Category inference over a class list longer than the language model's context (LVIS, 1203 names).

:meth:`psalm.modeling.meta_arch.PSALM.inference` calls :func:`maybe_chunked_category_inference` for
every category-task group, so ``tools/train_net.py``, ``tools/eval_zero_shot.py``, the predictor and
the demo all use it. When the prompt with all K names fits the context, it returns None and the
ordinary single forward runs (bit-identical results). Otherwise (:mod:`psalm.data.class_budget`):

1. the images are encoded once;
2. the class list is split into consecutive chunks that fit (:meth:`ClassContextBudget.chunks`);
3. one forward per chunk (the chunk's names, background appended as always) on that encoding;
4. :meth:`PSALMPostProcessor.merge_class_chunks` merges the chunks by score (instance top-k over
   all (query, class) pairs, LVIS 300 per image via the metadata's ``detections_per_image``;
   panoptic segments over the queries of every chunk; semantic maps per class).

Each chunk's class probabilities come from a softmax over that chunk's classes plus background,
so scores of different chunks are compared as they are (documented choice, datasets/README.md).
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["model_class_budget", "maybe_chunked_category_inference"]


def model_class_budget(model, image_size: int):
    """The :class:`~psalm.data.class_budget.ClassContextBudget` of ``model`` for S x S inputs."""
    from psalm.data.class_budget import ClassContextBudget, num_image_tokens

    cache = model.__dict__.setdefault("_psalm_class_budgets", {})
    if image_size not in cache:
        builder = model._require_prompt_builder()
        context = min(builder.model_max_length, int(model.llm.config.max_position_embeddings))
        cache[image_size] = ClassContextBudget(
            builder, context, num_image_tokens(image_size), int(model.mask_tokens.shape[0])
        )
    return cache[image_size]


def _select(tree, idx):
    if torch.is_tensor(tree):
        return tree[idx]
    if isinstance(tree, Mapping):
        return {k: _select(v, idx) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_select(v, idx) for v in tree)
    return tree


@torch.no_grad()
def maybe_chunked_category_inference(model, batched_inputs: Sequence[Mapping], image_features=None):
    """Results of a category-task batch predicted in class chunks, or None when every prompt fits.

    Args:
        model: a PSALM model (eval mode).
        batched_inputs: inputs of one category task (any class lists).
        image_features: optional :meth:`encode_images` output of these inputs.
    """
    image_size = int(batched_inputs[0]["padding_mask"].shape[-1])
    budget = model_class_budget(model, image_size)
    if all(budget.fits(x["class_names"]) for x in batched_inputs):
        return None
    if image_features is None:
        image_features = model.encode_images(batched_inputs)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(batched_inputs):
        groups.setdefault(tuple(x["class_names"]), []).append(i)
    results: list = [None] * len(batched_inputs)
    for names, idx in groups.items():
        inputs = [batched_inputs[i] for i in idx]
        feats = image_features if len(idx) == len(batched_inputs) else _select(image_features, idx)
        chunks = budget.chunks(list(names))
        if len(chunks) > 1:
            logger.debug("%d class names over the context: %d chunks", len(names), len(chunks))
        per_image = [[] for _ in inputs]
        for chunk in chunks:
            chunk_inputs = []
            for x in inputs:
                y = {k: v for k, v in x.items() if k != "prompt"}  # the chunk's prompt is built for its names
                y["class_names"] = [names[k] for k in chunk]
                if x.get("is_thing") is not None:
                    y["is_thing"] = [x["is_thing"][k] for k in chunk]
                chunk_inputs.append(y)
            out = model.forward_segmentation(chunk_inputs, image_features=feats).outputs
            for b in range(len(inputs)):
                per_image[b].append((out["pred_masks"][b], out["pred_class_logits"][b], chunk))
        for b, i in enumerate(idx):
            results[i] = model.postprocessor.merge_class_chunks(inputs[b], per_image[b])
    return results
