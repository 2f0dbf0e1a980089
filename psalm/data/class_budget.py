"""Category prompts that exceed the language model's context (LVIS: 1203 names, ~3.7k ids).

A category prompt lists every class name: after splicing, each name becomes its tokens plus
``[SEG]``. The spliced sequence must fit ``min(MODEL.PSALM.MODEL_MAX_LENGTH,
MODEL.PSALM.LLM.MAX_POSITION_EMBEDDINGS)`` (phi-1_5: 2048). For a data set whose class list does
not fit (our choice, documented in datasets/README.md, "Long class lists"):

* **training** (:class:`PSALMDatasetMapper`): each image gets a class subset: the classes of its
  ground truth (positives) plus negatives drawn at random from the others, as many as fit; GT
  classes are renumbered into the subset (when even the positives do not fit, a random subset of
  them that fits is kept, with their masks);
* **inference** (:mod:`psalm.inference.class_chunks`, inside the model's inference, so every
  evaluation tool uses it): the classes are split into consecutive chunks that fit, one forward per
  chunk on the same image encoding, and the chunks' predictions are merged by score
  (instance: top-k over all (query, class) pairs; panoptic: the Mask2Former merge over the queries of
  every chunk; semantic: each class's map from its chunk).

:class:`ClassContextBudget` computes the spliced length exactly from the prompt builder:
``len(prompt ids) - (K + 1) placeholders + sum(len(name ids) + 1) over K + 1 names (background
included) + (image tokens - 1) + (mask tokens - 1)``.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["ClassContextBudget", "LazyClassBudget", "context_length"]


def context_length(cfg) -> int:
    """The longest spliced sequence the language model takes."""
    return int(min(cfg.MODEL.PSALM.MODEL_MAX_LENGTH, cfg.MODEL.PSALM.LLM.MAX_POSITION_EMBEDDINGS))


def num_image_tokens(image_size: int) -> int:
    """Image tokens per S x S input: (S / 64)^2 (the projector's output grid on res5)."""
    return (int(image_size) // 64) ** 2


class ClassContextBudget:
    """Spliced length of a category prompt, and class chunks / subsets that fit the context.

    Args:
        builder: the model's :class:`psalm.data.prompt.PromptBuilder`.
        context: the longest spliced sequence (:func:`context_length`).
        num_image_tokens: image tokens per image ((S / 64)^2).
        num_mask_tokens: Q.
        task: a category task (the prompt text is the same for all three).
    """

    def __init__(self, builder, context: int, num_image_tokens: int, num_mask_tokens: int, task: str = "instance"):
        from psalm.data.prompt import BACKGROUND_CLASS

        self.builder = builder
        self.context = int(context)
        self.background = BACKGROUND_CLASS
        one = len(builder.encode_text(builder.render(task, num_classes=2)))
        two = len(builder.encode_text(builder.render(task, num_classes=3)))
        # prompt ids with n = K + 1 names: fixed + per_name * n (placeholders included)
        self._per_name = two - one
        self._fixed = one - 2 * self._per_name
        self._extra = (int(num_image_tokens) - 1) + (int(num_mask_tokens) - 1)
        self._bg_len = self.name_length(BACKGROUND_CLASS)

    @classmethod
    def from_config(cls, cfg, builder=None) -> "ClassContextBudget":
        """From a config (the tokenizer is loaded when no builder is given)."""
        if builder is None:
            from psalm.data.prompt import build_prompt_builder

            builder = build_prompt_builder(cfg)
        image_tokens = num_image_tokens(cfg.INPUT.IMAGE_SIZE)
        return cls(builder, context_length(cfg), image_tokens, int(cfg.MODEL.PSALM.NUM_MASK_TOKENS))

    def name_length(self, name: str) -> int:
        """Ids of one class span: the name's tokens plus ``[SEG]``."""
        return int(self.builder._encode_name(name).numel())

    def names_cost(self, names: Sequence[str]) -> int:
        """What the K names add to the spliced length (their spans and their share of the prompt)."""
        return sum(self.name_length(n) + self._per_name - 1 for n in names)

    def spliced_length(self, names: Sequence[str]) -> int:
        """Spliced sequence length of a category prompt with these K names (background is added)."""
        base = self._fixed + self._per_name - 1 + self._bg_len + self._extra  # the prompt without names + bg
        return base + self.names_cost(names)

    @property
    def capacity(self) -> int:
        """The most that :meth:`names_cost` may be."""
        return self.context - self.spliced_length([])

    def fits(self, names: Sequence[str]) -> bool:
        return self.spliced_length(names) <= self.context

    def _check_capacity(self, names: Sequence[str]) -> None:
        if self.capacity <= 0:
            raise ValueError(
                f"a category prompt without class names is already {self.spliced_length([])} ids long, more "
                f"than the context ({self.context}: MODEL.PSALM.MODEL_MAX_LENGTH / LLM.MAX_POSITION_EMBEDDINGS)"
            )
        too_long = [n for n in names if self.name_length(n) + self._per_name - 1 > self.capacity]
        if too_long:
            raise ValueError(f"class name {too_long[0]!r} alone does not fit the context ({self.context} ids)")

    def chunks(self, names: Sequence[str]) -> List[List[int]]:
        """Consecutive index chunks of ``names`` whose prompts each fit (one chunk when all fit)."""
        self._check_capacity(names)
        out: List[List[int]] = [[]]
        used = 0
        for i, n in enumerate(names):
            c = self.name_length(n) + self._per_name - 1
            if out[-1] and used + c > self.capacity:
                out.append([])
                used = 0
            out[-1].append(i)
            used += c
        return out

    def training_subset(
        self, names: Sequence[str], positives: Sequence[int], rng: Optional[np.random.Generator] = None
    ) -> List[int]:
        """Sorted class indices for one training image: every positive (ground-truth class) plus random
        negatives, as many as fit. When the positives alone do not fit, a random subset of them is kept."""
        self._check_capacity(names)
        rng = rng if rng is not None else np.random.default_rng(np.random.randint(1 << 31))
        pos = sorted(set(int(p) for p in positives))
        costs = [self.name_length(n) + self._per_name - 1 for n in names]
        used, keep = 0, []
        for p in (pos if sum(costs[p] for p in pos) <= self.capacity else rng.permutation(pos).tolist()):
            if used + costs[p] <= self.capacity:
                keep.append(p)
                used += costs[p]
        pos_set = set(pos)
        for n in rng.permutation(len(names)).tolist():
            if n in pos_set:
                continue
            if used + costs[n] <= self.capacity:
                keep.append(n)
                used += costs[n]
            elif used >= self.capacity - min(costs):
                break
        return sorted(keep)


class LazyClassBudget:
    """A :class:`ClassContextBudget` built from a config on first need (it loads the tokenizer).

    :meth:`may_overflow` is a cheap test without the tokenizer: it assumes at most one token per
    UTF-8 byte of a name (byte-level BPE) plus the fixed prompt; a list that passes it fits for sure.
    """

    _FIXED_BOUND = 512  # ids of the category prompt without names (official: ~150), with margin

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self._budget: Optional[ClassContextBudget] = None
        self._extra = num_image_tokens(cfg.INPUT.IMAGE_SIZE) + int(cfg.MODEL.PSALM.NUM_MASK_TOKENS)

    def may_overflow(self, names: Sequence[str]) -> bool:
        bound = self._FIXED_BOUND + self._extra + sum(len(n.encode("utf-8")) + 4 for n in names)
        return bound > context_length(self.cfg)

    def get(self) -> ClassContextBudget:
        if self._budget is None:
            self._budget = ClassContextBudget.from_config(self.cfg)
        return self._budget
