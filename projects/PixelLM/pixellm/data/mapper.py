"""``PixelLMDatasetMapper``: a multi-target dataset dict -> the model input dict (see ``meta_arch``).

Per question: the dict's ``question_template`` (default the MUSE one, ``"<image>\\n{question} Please
respond with segmentation mask."``; the referring / semantic conversions give ``"<image>\\n{question}"``
with the official short questions) and the answer = ``text_answers[i]`` with each ``{seg}`` replaced
by one codebook group, or (no text answer: MUSE) the official MR templates ``"{a} is [SEG]."`` /
``"{a, b and c} are [SEG], [SEG] and [SEG], separately."``. A conversation longer than ``max_length``
tokens is DROPPED with its targets (never truncated through a codebook group); drops are counted
(``num_dropped``) and logged.

Besides multi-target dicts the mapper takes the other training items of the mixture (see
:func:`pixellm.data.datasets.training_items`), converted at every draw with the draw's RNG:
a list of referring records of one image (:func:`~pixellm.data.muse.multi_target_from_referring`),
a semantic dict (``task == "semantic"``, :func:`~pixellm.data.muse.multi_target_from_semantic`) and
a LLaVA conversation (``conversations``, CE only). A target's mask is its ``mask`` (bool [H, W]) when
given, else its ``segmentation`` (polygons / RLE).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from psalm.data.datasets.muse import SEG_PLACEHOLDER, check_seg_count
from psalm.evaluation.masks import annotation_to_mask
from psalm.utils.image_io import read_image_rgb

from ..modeling.vision import preprocess_clip_image
from .muse import multi_target_from_referring, multi_target_from_semantic
from .prompt import (IMAGE_TOKEN, build_conversation, codebook_group, join_phrases, tokenize_conversation,
                     tokenizer_image_token)

__all__ = ["PixelLMDatasetMapper", "answer_text", "QUESTION_TEMPLATE"]

logger = logging.getLogger(__name__)
QUESTION_TEMPLATE = IMAGE_TOKEN + "\n{sent} Please respond with segmentation mask."
_MULTI = ("{names} are {seg}, separately.", "{names} are {seg}.", "Sure, {names} are {seg}.")


def answer_text(names, text_answer, group: str, rng: np.random.Generator | None = None) -> str:
    """The answer with one codebook group per target (in target order)."""
    if text_answer is not None:
        check_seg_count(text_answer, len(names))
        return text_answer.replace(SEG_PLACEHOLDER, group)
    if len(names) == 1:
        return f"{names[0]} is {group}."
    tpl = _MULTI[int(rng.integers(len(_MULTI)))] if rng is not None else _MULTI[0]
    return tpl.format(names=join_phrases(names), seg=join_phrases([group] * len(names)))


def _target_mask(target: dict, h: int, w: int) -> np.ndarray:
    """bool [h, w] of a target: its ``mask`` when given, else its ``segmentation``."""
    if "mask" not in target:
        return annotation_to_mask(target["segmentation"], h, w)
    m = np.asarray(target["mask"], dtype=bool)
    if m.shape != (h, w):
        raise ValueError(f"target {target.get('name')!r}: mask is {m.shape}, the image is {(h, w)}")
    return m


class PixelLMDatasetMapper:
    """
    Args:
        tokenizer: the model's tokenizer (with the codebook tokens).
        image_size: S (448 for the release). num_codebook_tokens: L*N.
        is_train: answers + labels + GT (training); else the teacher-forced inputs (``answers_given``)
            and the generation prompts (``prompt_ids``) plus GT masks when present.
        max_length: conversations with more tokens are dropped (0: no limit).
    """

    def __init__(self, tokenizer, image_size: int, num_codebook_tokens: int = 6, is_train: bool = True,
                 max_length: int = 0, pixel_mean=None, pixel_std=None):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.group = codebook_group(num_codebook_tokens)
        self.is_train = is_train
        self.max_length = int(max_length)
        self.eos = tokenizer.eos_token
        self.norm = {} if pixel_mean is None else {"pixel_mean": tuple(pixel_mean), "pixel_std": tuple(pixel_std)}
        self.num_dropped = 0

    def __call__(self, d, rng: np.random.Generator | None = None) -> dict | None:
        if isinstance(d, list):  # the referring records of one image -> a multi-target dict
            converted = multi_target_from_referring(d, rng if rng is not None else np.random.default_rng(0))
            if not converted:
                return None
            d = converted[0]
        elif d.get("task") == "semantic" and "questions" not in d:  # a label map -> class questions
            d = multi_target_from_semantic(d, rng if rng is not None else np.random.default_rng(0))
            if d is None:
                return None
        if "questions" not in d and "conversations" in d:
            return self._vqa(d)
        image = read_image_rgb(d["file_name"])
        h, w = image.shape[:2]
        if (h, w) != (int(d["height"]), int(d["width"])):
            raise ValueError(f"{d['file_name']}: image is {h}x{w}, the annotation says {d['height']}x{d['width']}")
        clip_image, clip_size = preprocess_clip_image(image, self.image_size, **self.norm)
        ids, labels, prompts, masks, names_all = [], [], [], [], []
        for q, targets, ta in zip(d["questions"], d["targets"], d.get("text_answers") or [None] * len(d["questions"])):
            names = [t["name"] for t in targets]
            question = d.get("question_template", QUESTION_TEMPLATE).format(sent=q)
            conv = build_conversation(question, answer_text(names, ta, self.group, rng if self.is_train else None),
                                      eos_token=self.eos)
            i, lab = tokenize_conversation(self.tokenizer, conv)
            if self.max_length and len(i) > self.max_length:
                self.num_dropped += 1
                logger.info("dropped a question of %s: %d tokens > max_length %d (%d dropped so far)",
                            d["file_name"], len(i), self.max_length, self.num_dropped)
                continue
            ids.append(i), labels.append(lab)
            prompts.append(tokenizer_image_token(build_conversation(question), self.tokenizer))
            masks += [_target_mask(t, h, w) for t in targets]
            names_all.append(names)
        if not ids:
            return None
        out = {"clip_image": clip_image, "clip_size": clip_size, "height": h, "width": w,
               "input_ids": ids, "labels": labels, "gt_masks": torch.from_numpy(np.stack(masks)).bool(),
               "target_names": names_all, "questions": list(d["questions"]), "image_id": d.get("image_id"),
               "file_name": d["file_name"]}
        if not self.is_train:
            out["prompt_ids"] = prompts
            out["answers_given"] = True
        return out

    def _vqa(self, d: dict) -> dict | None:
        """A LLaVA conversation (psalm's ``conversations`` dicts): CE only, no targets."""
        from .prompt import tokenize_multi_round

        image = read_image_rgb(d["file_name"])
        clip_image, clip_size = preprocess_clip_image(image, self.image_size, **self.norm)
        turns = d["conversations"]
        rounds = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns) - 1, 2)
                  if turns[i]["from"] == "human" and turns[i + 1]["from"] == "gpt"]
        if not rounds or IMAGE_TOKEN not in rounds[0][0]:
            raise ValueError(f"{d['file_name']}: a LLaVA conversation needs human/gpt turns with <image> in the first")
        ids, labels = tokenize_multi_round(self.tokenizer, rounds, eos_token=self.eos)
        if self.max_length and len(ids) > self.max_length:
            self.num_dropped += 1
            return None
        h, w = image.shape[:2]
        return {"clip_image": clip_image, "clip_size": clip_size, "height": h, "width": w, "input_ids": [ids],
                "labels": [labels], "gt_masks": torch.zeros(0, h, w, dtype=torch.bool), "target_names": [[]],
                "file_name": d["file_name"], "image_id": d.get("image_id")}
