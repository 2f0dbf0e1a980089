"""Dataset dicts (psalm's registered data sets, detectron2 conventions) -> Pixel-SAIL model inputs.

One mapper for training and evaluation (``PixelSAILDatasetMapper(cfg, is_train, dataset_name, task)``,
callable ``mapper(dataset_dict, rng=None)``, usable as ``build_psalm_train_loader``'s mapper factory).
Tasks and their dialogues (question templates ``TEMPLATES``):

* ``referring`` / ``gres``: "Please segment {sentence} in this image." -> "It is [SEG]." with the union
  of the referred objects (one ``[SEG]`` per expression; gRefCOCO unions, spec B1.3); a no-target gres
  expression is answered "No target [SEG]." with an all-zero mask. A dict with several sentences
  (``*_per_ref``) becomes a dialogue of up to ``DATA.MAX_TURNS`` turns.
* ``interactive`` -> visual-prompt category classification: each region's visual prompt (psalm's
  point / scribble / box / mask rasters, decoded at the original size) is injected as ``<Prompt_k>``; the
  prompts are ordered by area, largest first (so smaller ones overwrite), prompt numbers are a random
  permutation in training and 0..R-1 in evaluation; one turn per region:
  "What is the category of the region marked by <Prompt_k>?" -> "{class name}.". At most
  ``NUM_VISUAL_PROMPTS`` regions (the rest are dropped from prompts AND ground truth; the kept ones are
  listed in ``region_ann_indices``).
  In training, with probability ``DATA.VP_NEGATIVE_RATIO`` (0.05) one more turn asks about an unused prompt
  number and is answered "<Prompt_j> is not in the image." (official VP datasets).
* ``instance`` / ``semantic`` (COCO panoptic modes, training): up to ``DATA.MAX_CLASSES`` (5) classes of
  the image, one turn each: "Please segment the {cls} in this image. Segmentation in the instance mode." ->
  "{cls}-1 [SEG] {cls}-2 [SEG]." (one mask per instance, in order), and "... semantic mode." -> "{cls} [SEG]."
  (the class's pixels of the semantic label map). The spec elides part of the official question text.
* ``caption`` / ``instruction``: the LLaVA ``conversations`` as turns (LM loss only).
* ``muse`` (training; psalm's MUSE dicts, :mod:`psalm.data.datasets.muse`): one turn per question of the image,
  in the dict's order: the question as written (the spec gives no Pixel-SAIL template) -> its ``text_answers``
  entry with each ``{seg}`` replaced by ``[SEG]`` (one per target, multiple inline ``[SEG]``s, spec B1.3); a
  question without a text answer (issue #14 of the release) is answered by its target phrases,
  "{a} is [SEG], {b} is [SEG] and {c} is [SEG]." (our composition). The GT masks are the targets' masks in
  answer order over all turns. A question whose ``{seg}`` count differs from its targets is dropped and counted
  (``num_muse_dropped``, logged); a dict left without a question is a ``ValueError``: psalm's train loader
  cannot skip a sample, and psalm's MUSE loader keeps only images with a usable question.

Training dialogues of ``referring`` / ``gres`` take up to ``DATA.MAX_TURNS`` (5) expressions of the same
image (other objects' samples of the data set, as the official RefCOCO datasets), one ``[SEG]`` per turn and
the GT masks in answer order.

Output: the model-input dict described in ``pixel_sail.modeling`` plus ``file_name``, ``image_id``,
``sample_id`` (passed through for the evaluators) and ``image_uint8`` [3, H, W] (teachers).
"""
from __future__ import annotations

import copy
import logging
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as d2_utils

from psalm.data.datasets.muse import SEG_PLACEHOLDER, check_seg_count, seg_count_matches
from psalm.data.mapper import read_label_map
from psalm.data.text import join_phrases
from psalm.data.visual_prompts import decode_rle
from psalm.evaluation.masks import annotation_to_mask, union_mask

from .patchify import mask_to_patches, preprocess_image
from .tokens import prompt_token

__all__ = ["PixelSAILDatasetMapper", "prompt_inputs", "TEMPLATES", "vp_question", "referring_question", "parse_category",
           "TASKS", "check_pixel_sail_task", "muse_answer"]

logger = logging.getLogger(__name__)

# the tasks the mapper maps: psalm's (except panoptic) plus MUSE, which psalm's own model has no task for
TASKS = ("referring", "gres", "interactive", "instance", "semantic", "caption", "instruction", "muse")

TEMPLATES = {
    "referring": "Please segment {sent} in this image.",
    "answer": "It is [SEG].",
    "no_target": "No target [SEG].",
    "vp_category": "What is the category of the region marked by {prompt}?",
    "vp_answer": "{name}.",
    "vp_negative": "{prompt} is not in the image.",
    # COCO panoptic modes (spec B1.3; the spec elides part of the official question, "..." below)
    "instance": "Please segment the {cls} in this image. Segmentation in the instance mode.",
    "semantic": "Please segment the {cls} in this image. Segmentation in the semantic mode.",
}
PROMPT_ORDER = ("mask", "box", "scribble", "point")
SEG = "[SEG]"


def check_pixel_sail_task(task: str) -> str:
    """``task`` if the Pixel-SAIL mapper maps it (``TASKS``), else ``ValueError`` listing them (the
    ``task_check`` of psalm's train loader: ``DATASETS.TRAIN_TASKS`` and the data sets' metadata)."""
    if task not in TASKS:
        raise ValueError(f"Pixel-SAIL: unsupported task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def muse_answer(text_answer: Optional[str], names: List[str]) -> str:
    """A MUSE answer with one ``[SEG]`` per target: ``text_answer`` with each ``{seg}`` replaced (its count
    must equal ``len(names)``), or without a text answer ``"{a} is [SEG], {b} is [SEG] and {c} is [SEG]."``"""
    if text_answer is not None:
        check_seg_count(text_answer, len(names))
        return text_answer.replace(SEG_PLACEHOLDER, SEG)
    if not names:
        raise ValueError("a MUSE answer needs at least one target")
    return join_phrases(f"{name} is {SEG}" for name in names) + "."


def referring_question(sentence: str) -> str:
    return TEMPLATES["referring"].format(sent=sentence.strip().rstrip("."))


def vp_question(k: int) -> str:
    return TEMPLATES["vp_category"].format(prompt=prompt_token(k))


def parse_category(text: str, class_names: List[str]) -> Optional[str]:
    """The class name the answer names first (whole words, case-insensitive), None if none."""
    import re

    best, best_pos = None, None
    for name in class_names:
        m = re.search(r"\b" + re.escape(name.lower()) + r"s?\b", text.lower())
        if m and (best_pos is None or m.start() < best_pos):
            best, best_pos = name, m.start()
    return best


def prompt_inputs(masks: np.ndarray, grid_hw, numbers):
    """Visual-prompt masks bool [R, H, W] (original size) with prompt numbers -> (``vp_patch_masks`` bool
    [R, h, w], ``vp_ids``), ordered by area, largest first, so that smaller prompts overwrite larger ones
    where they overlap (the official datasets' order). Used by the mapper and the predictor."""
    masks = np.asarray(masks, dtype=bool)
    if len(numbers) != len(masks):
        raise ValueError(f"{len(numbers)} prompt numbers for {len(masks)} prompt masks")
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    t = torch.as_tensor(masks[order]) if len(masks) else torch.zeros(0, 1, 1, dtype=torch.bool)
    patch = mask_to_patches(t, grid_hw) if len(masks) else torch.zeros(0, *grid_hw, dtype=torch.bool)
    return patch, [int(numbers[i]) for i in order]


class PixelSAILDatasetMapper:
    def __init__(self, cfg, is_train: bool, dataset_name: str = "", task: Optional[str] = None):
        ps = cfg.MODEL.PIXEL_SAIL
        self.is_train = bool(is_train)
        self.task = task
        self.patch_size, self.max_side = ps.PATCH_SIZE, ps.MAX_IMAGE_SIDE
        self.mean, self.std = list(ps.PIXEL_MEAN), list(ps.PIXEL_STD)
        self.num_vp = ps.NUM_VISUAL_PROMPTS
        self.max_turns = ps.DATA.MAX_TURNS
        self.rasterizer = cfg.TEST.PSALM.GT_POLYGON_RASTERIZER
        meta = MetadataCatalog.get(dataset_name) if dataset_name else None
        self.class_names = list(getattr(meta, "thing_classes", []) or []) if meta is not None else []
        self.prompt_types = list(cfg.INPUT.INTERACTIVE_PROMPT_TYPES)
        self.vp_negative_ratio = ps.DATA.VP_NEGATIVE_RATIO
        self.max_classes = ps.DATA.MAX_CLASSES
        self.stuff_classes = list(getattr(meta, "stuff_classes", []) or []) if meta is not None else []
        self.ignore_label = getattr(meta, "ignore_label", 255) if meta is not None else 255
        self.num_muse_dropped = 0  # MUSE questions without a target or whose {seg} count differs from them
        # referring / gres training: the other samples of each image, for multi-expression dialogues
        self.by_image = None
        if self.is_train and task in ("referring", "gres") and dataset_name and self.max_turns > 1:
            from collections import defaultdict

            from detectron2.data import DatasetCatalog

            self.by_image = defaultdict(list)
            for r in DatasetCatalog.get(dataset_name):
                self.by_image[r["image_id"]].append(r)

    # ------------------------------------------------------------------ helpers
    def _image(self, d: dict):
        img = d2_utils.read_image(d["file_name"], format="RGB")
        d.setdefault("height", img.shape[0])  # detectron2's load_sem_seg dicts have no size
        d.setdefault("width", img.shape[1])
        if (img.shape[0], img.shape[1]) != (d["height"], d["width"]):
            raise ValueError(f"{d['file_name']}: image is {img.shape[:2]}, dataset dict says {(d['height'], d['width'])}")
        px = preprocess_image(img, self.patch_size, self.max_side, self.mean, self.std)
        return img, px

    def _resize_masks(self, masks: np.ndarray, hw) -> torch.Tensor:
        m = torch.as_tensor(masks, dtype=torch.float32)
        if m.numel() == 0:
            return torch.zeros((len(m), *hw))
        return F.interpolate(m[None], size=hw, mode="nearest")[0]

    def _category_name(self, ann) -> str:
        if not self.class_names:
            raise ValueError("interactive (visual-prompt category) data needs metadata thing_classes")
        return self.class_names[ann["category_id"]]

    # ------------------------------------------------------------------ tasks
    def _referring_turn(self, d, task, rng):
        """(question, answer, GT union mask [H, W]) of one expression of ``d``."""
        sentences = list(d["sentences"])
        sent = sentences[int(rng.integers(len(sentences)))] if len(sentences) > 1 else sentences[0]
        no_target = bool(d.get("no_target", False)) or not d.get("annotations")
        answer = TEMPLATES["no_target"] if (task == "gres" and no_target) else TEMPLATES["answer"]
        gt = union_mask(d.get("annotations", []), d["height"], d["width"], rasterizer=self.rasterizer)
        return referring_question(sent), answer, gt

    def _referring(self, d, out, hw, rng):
        sentences = list(d["sentences"])
        if self.is_train:
            samples = [d]
            if self.by_image is not None:
                others = [r for r in self.by_image.get(d["image_id"], []) if r.get("sample_id") != d.get("sample_id")]
                k = min(len(others), self.max_turns - 1)
                samples += [others[i] for i in rng.choice(len(others), k, replace=False)] if k else []
            turns, masks = [], []
            for r in samples:
                q, a, m = self._referring_turn(r, d["task"], rng)
                turns.append((q, a))
                masks.append(m)
            out["turns"] = turns
            out["gt_masks"] = self._resize_masks(np.stack(masks), hw)
        else:
            # one sentence per evaluated sample (official RES protocol); merged for *_per_ref dicts
            out["question"] = referring_question(" ".join(sentences) if len(sentences) > 1 else sentences[0])

    def _interactive(self, d, out, grid, rng):
        H, W = d["height"], d["width"]
        regions = []
        for j, ann in enumerate(d.get("annotations", [])):
            vps = ann.get("visual_prompts") or {}
            types = [t for t in self.prompt_types if t in vps] if self.is_train else [t for t in PROMPT_ORDER if t in vps]
            if not types:
                continue
            t = types[int(rng.integers(len(types)))] if self.is_train else types[0]
            m = decode_rle(vps[t]).astype(bool)
            if m.shape != (H, W):
                raise ValueError(f"visual prompt of {d.get('sample_id')} is {m.shape}, image {(H, W)}")
            regions.append((j, m))
        if len(regions) > self.num_vp:
            keep = sorted(rng.choice(len(regions), self.num_vp, replace=False)) if self.is_train else range(self.num_vp)
            regions = [regions[i] for i in keep]
        if self.is_train:
            numbers = [int(k) for k in rng.permutation(self.num_vp)[:len(regions)]]
        else:
            numbers = list(range(len(regions)))
        masks = np.stack([m for _, m in regions]) if regions else np.zeros((0, H, W), bool)
        out["vp_patch_masks"], out["vp_ids"] = prompt_inputs(masks, grid, numbers)
        out["region_ann_indices"] = [regions[i][0] for i in range(len(regions))]
        qa = [(vp_question(numbers[i]), TEMPLATES["vp_answer"].format(name=self._category_name(d["annotations"][regions[i][0]])))
              for i in range(len(regions))]
        if self.is_train:
            perm = rng.permutation(len(qa))
            out["turns"] = [qa[i] for i in perm]
            unused = [k for k in range(self.num_vp) if k not in numbers]
            if unused and rng.random() < self.vp_negative_ratio:
                j = unused[int(rng.integers(len(unused)))]
                out["turns"].append((vp_question(j), TEMPLATES["vp_negative"].format(prompt=prompt_token(j))))
            out["gt_masks"] = None
        else:
            out["questions"] = [q for q, _ in qa]

    def _panoptic_mode(self, d, out, hw, rng, mode):
        if not self.is_train:
            raise ValueError(f"the {mode}-mode data is for training; evaluate panoptic data with psalm's tools")
        H, W = d["height"], d["width"]
        groups = {}
        if mode == "instance":
            names = self.class_names
            for ann in d.get("annotations", []):
                if not ann.get("iscrowd", 0):
                    groups.setdefault(ann["category_id"], []).append(
                        annotation_to_mask(ann["segmentation"], H, W, rasterizer=self.rasterizer))
        else:
            names = self.stuff_classes
            label = read_label_map(d["sem_seg_file_name"])
            for c in np.unique(label):
                if c != self.ignore_label:
                    groups[int(c)] = [label == c]
        if not names:
            raise ValueError(f"{mode}-mode data needs metadata {'thing_classes' if mode == 'instance' else 'stuff_classes'}")
        classes = sorted(groups)
        if len(classes) > self.max_classes:
            classes = sorted(rng.choice(classes, self.max_classes, replace=False).tolist())
        turns, masks = [], []
        for c in classes:
            name = names[c]
            if mode == "instance":
                answer = " ".join(f"{name}-{i + 1} [SEG]" for i in range(len(groups[c]))) + "."
            else:
                answer = f"{name} [SEG]."
            turns.append((TEMPLATES[mode].format(cls=name), answer))
            masks += groups[c]
        out["turns"] = turns
        out["gt_masks"] = self._resize_masks(np.stack(masks) if masks else np.zeros((0, H, W)), hw)

    def _muse(self, d, out, hw):
        """Turns and GT masks of a MUSE dict (module doc); ``gt_masks`` [N, H', W'] in answer order."""
        where = d.get("file_name", "?")
        if not self.is_train:
            raise ValueError(f"{where}: MUSE data is for training (Pixel-SAIL reports no MUSE figure, spec B3)")
        questions, targets = d.get("questions"), d.get("targets")
        if not questions or targets is None or len(targets) != len(questions):
            raise ValueError(f"{where}: a MUSE dict needs 'questions' and one 'targets' list per question "
                             f"(psalm.data.datasets.muse); keys {sorted(d)}")
        text_answers = d.get("text_answers") or [None] * len(questions)
        if len(text_answers) != len(questions):
            raise ValueError(f"{where}: {len(questions)} questions but {len(text_answers)} text_answers")
        H, W = d["height"], d["width"]
        turns, masks, dropped = [], [], 0
        for q, ts, ta in zip(questions, targets, text_answers):
            if not ts or not seg_count_matches(ta, len(ts)):
                dropped += 1
                continue
            turns.append((q, muse_answer(ta, [t["name"] for t in ts])))
            masks += [annotation_to_mask(t["segmentation"], H, W, rasterizer=self.rasterizer) for t in ts]
        if dropped:
            self.num_muse_dropped += dropped
            logger.info("MUSE %s: dropped %d of %d question(s) without a target or whose {seg} count differs from "
                        "their targets (%d dropped so far)", where, dropped, len(questions), self.num_muse_dropped)
        if not turns:
            raise ValueError(f"{where}: no MUSE question left ({dropped} without a target or with a {{seg}} count "
                             "other than their targets); psalm's train loader cannot skip a sample: load MUSE with "
                             "psalm.data.datasets.muse, which keeps only images with a usable question")
        for k in ("questions", "targets", "text_answers"):
            out.pop(k, None)
        out["turns"] = turns
        out["gt_masks"] = self._resize_masks(np.stack(masks), hw)

    def _conversation(self, d, out):
        conv = d.get("conversations") or d.get("conversation")
        turns = []
        for i in range(0, len(conv) - 1, 2):
            if conv[i]["from"] != "human" or conv[i + 1]["from"] != "gpt":
                raise ValueError(f"{d.get('sample_id')}: conversations must alternate human / gpt")
            turns.append((conv[i]["value"], conv[i + 1]["value"]))
        if self.is_train:
            out["turns"], out["gt_masks"] = turns, None
        else:
            out["question"] = turns[0][0]

    # ------------------------------------------------------------------ call
    def __call__(self, dataset_dict: dict, rng: Optional[np.random.Generator] = None) -> dict:
        d = copy.deepcopy(dataset_dict)
        task = self.task or d.get("task")
        d["task"] = task
        rng = rng if rng is not None else np.random.default_rng()
        img, px = self._image(d)  # sets height / width when the dict lacks them
        p = self.patch_size
        grid = (px.shape[1] // p, px.shape[2] // p)
        out = {k: v for k, v in d.items() if k not in ("annotations", "segments_info", "conversations")}
        out.update(pixel_values=px, grid_hw=grid, task=task, image_uint8=torch.from_numpy(np.array(img)).permute(2, 0, 1))
        if task in ("referring", "gres"):
            self._referring(d, out, tuple(px.shape[1:]), rng)
        elif task == "interactive":
            self._interactive(d, out, grid, rng)
        elif task in ("instance", "semantic"):
            self._panoptic_mode(d, out, tuple(px.shape[1:]), rng, task)
        elif task in ("caption", "instruction"):
            self._conversation(d, out)
        elif task == "muse":
            self._muse(d, out, tuple(px.shape[1:]))
        else:
            raise ValueError(f"Pixel-SAIL mapper: unsupported task {task!r} ({', '.join(TASKS)})")
        return out
