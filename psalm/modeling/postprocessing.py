"""Inference post-processing for every PSALM segmentation task (one module, batched).

The predictor gives stride-4 mask logits for Q queries and one score head per task
(``docs/DESIGN.md``, "Forward data flow"). This module turns them into detectron2-standard outputs
at the original image size:

1. :func:`resize_mask_logits`: bilinear upsample to the padded input size S x S, crop the valid
   (non-padding) region read from ``padding_mask``, bilinear resize to the original (height, width)
   (detectron2 ``sem_seg_postprocess``). Done in the logits' dtype, at least fp32.
2. the task's inference, in **fp32** as the official code does:

   * ``panoptic``: Mask2Former rules (``object_mask_threshold`` / ``overlap_threshold``, stuff
     segments of a class merged), plus ``sem_seg`` and thing-only ``instances`` when enabled;
   * ``instance``: top-k over Q*K of class prob, score = class prob * mask score, boxes from masks;
   * ``semantic``: ``einsum("qk,qhw->khw", softmax[:, :K], sigmoid(masks))``;
   * ``referring``: the top-1 query of sigmoid(refer logit) * mask score;
   * ``gres``: the union of the query masks whose score exceeds a threshold; when none does,
     the top-1 mask (``"top1"``, official) or nothing with ``no_target=True`` (``"empty"``);
   * ``interactive``: for each region the top-1 query of sigmoid(region logit) * mask score.

"Mask score" is the mean sigmoid inside the binary mask (logit > 0), as in Mask2Former.

Precision: every function here (and :class:`PSALMPostProcessor`) is an fp32 island. Inputs are cast
to (at least) fp32 and autocast is switched off inside, so that a model run under bf16 / fp16
autocast (the predictor, ``tools/eval_zero_shot.py``, training-time evaluation) post-processes
exactly as an fp32 run does: without this, autocast runs ``semantic_inference``'s einsum (a bmm) in
bf16 and about 1% of the semantic labels flip.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, Instances

from .tasks import CATEGORY_TASKS, check_task

logger = logging.getLogger(__name__)

__all__ = [
    "PSALMPostProcessor",
    "fp32_island",
    "valid_size_from_padding_mask",
    "resize_mask_logits",
    "mask_scores",
    "masks_to_boxes",
    "semantic_inference",
    "instance_inference",
    "panoptic_inference",
    "panoptic_merge",
    "referring_scores",
    "referring_inference",
    "gres_inference",
    "interactive_scores",
    "interactive_inference",
]

GRES_NO_TARGET_MODES = ("top1", "empty")


def _first_tensor_device(args, kwargs) -> str | None:
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v):
            return v.device.type
        if isinstance(v, Mapping):  # predictor outputs
            for w in v.values():
                if torch.is_tensor(w):
                    return w.device.type
    return None


def fp32_island(fn):
    """Run ``fn`` with autocast disabled on the device of its first tensor argument (and on CPU).

    Post-processing is documented and tested as fp32; an enclosing ``torch.autocast`` must not turn
    its matmuls / einsums into bf16 or fp16.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = _first_tensor_device(args, kwargs)
        with contextlib.ExitStack() as stack:
            for dev in {"cpu", device} - {None}:
                if torch.amp.is_autocast_available(dev):
                    stack.enter_context(torch.autocast(device_type=dev, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
def valid_size_from_padding_mask(padding_mask: torch.Tensor) -> tuple[int, int]:
    """(h, w) of the valid image region of a padded input.

    Args:
        padding_mask: bool [S, S], True on padding. The mapper pads right/bottom, so the valid
            region must be the top-left block.
    """
    if padding_mask.dim() != 2:
        raise ValueError(f"padding_mask must be [S, S], got shape {tuple(padding_mask.shape)}")
    valid = ~padding_mask.bool()
    rows = valid.any(dim=1).nonzero().flatten()
    cols = valid.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError("padding_mask is True everywhere: the image has no valid pixel")
    if int(rows[0]) != 0 or int(cols[0]) != 0:
        raise ValueError(
            "padding_mask must mark right/bottom padding (valid region at the top-left), got a valid "
            f"region starting at row {int(rows[0])}, column {int(cols[0])}"
        )
    return int(rows[-1]) + 1, int(cols[-1]) + 1


@fp32_island
def resize_mask_logits(
    mask_logits: torch.Tensor,
    input_size: tuple[int, int],
    valid_size: tuple[int, int],
    output_size: tuple[int, int],
) -> torch.Tensor:
    """Mask logits at stride 4 -> logits at the original image size.

    Args:
        mask_logits: [N, h, w] (stride-4 predictor output).
        input_size: padded input size (S, S) the masks are first upsampled to.
        valid_size: (h, w) of the valid region inside the padded input (top-left block).
        output_size: original (height, width).
    Returns:
        [N, height, width] in ``promote_types(mask_logits.dtype, float32)`` (autocast off).
    """
    dtype = torch.promote_types(mask_logits.dtype, torch.float32)
    x = F.interpolate(mask_logits[None].to(dtype), size=tuple(input_size), mode="bilinear", align_corners=False)[0]
    return sem_seg_postprocess(x, valid_size, int(output_size[0]), int(output_size[1]))


# ----------------------------------------------------------------------------------------------
# per-image inference (inputs already at the output size; all computed in fp32)
# ----------------------------------------------------------------------------------------------
@fp32_island
def mask_scores(mask_logits: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid inside each binary mask (logit > 0): [N, H, W] -> [N] (0 for an empty mask)."""
    m = mask_logits.float().flatten(1)
    binary = (m > 0).float()
    return (m.sigmoid() * binary).sum(1) / (binary.sum(1) + 1e-6)


def masks_to_boxes(masks: torch.Tensor) -> Boxes:
    """Tight XYXY boxes (exclusive max, detectron2 ``BitMasks`` convention) of bool masks [N, H, W].

    An empty mask gets an all-zero box. Stays on the masks' device.
    """
    n, h, w = masks.shape
    boxes = torch.zeros(n, 4, dtype=torch.float32, device=masks.device)
    if n == 0:
        return Boxes(boxes)
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)  # [N, W], [N, H]
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    big = float(max(h, w) + 1)
    nonempty = x_any.any(dim=1)
    boxes[:, 0] = torch.where(x_any, xs, big).amin(dim=1)
    boxes[:, 1] = torch.where(y_any, ys, big).amin(dim=1)
    boxes[:, 2] = torch.where(x_any, xs, -1.0).amax(dim=1) + 1
    boxes[:, 3] = torch.where(y_any, ys, -1.0).amax(dim=1) + 1
    boxes[~nonempty] = 0
    return Boxes(boxes)


def _instances(image_size, masks: torch.Tensor, scores: torch.Tensor, **fields) -> Instances:
    inst = Instances(tuple(image_size))
    inst.pred_masks = masks
    inst.pred_boxes = masks_to_boxes(masks)
    inst.scores = scores
    for k, v in fields.items():
        inst.set(k, v)
    return inst


@fp32_island
def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-class soft masks: class_logits [Q, K+1] (last = background), mask_logits [Q, H, W] -> [K, H, W]."""
    probs = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", probs, mask_logits.float().sigmoid())


@fp32_island
def instance_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    topk: int,
    is_thing: Sequence[bool] | None = None,
) -> Instances:
    """Mask2Former instance inference.

    Args:
        class_logits: [Q, K+1]; mask_logits: [Q, H, W].
        topk: number of (query, class) pairs kept from the Q*K class probabilities (clamped to Q*K).
        is_thing: K flags; when given (panoptic mode), pairs of stuff classes are then dropped.
    Returns:
        ``Instances`` with pred_masks bool [N, H, W], pred_boxes, scores [N] (class prob * mask
        score), pred_classes [N] (0-based contiguous), pred_query_ids [N]; sorted by class prob.
    """
    probs = F.softmax(class_logits.float(), dim=-1)[:, :-1]  # [Q, K]
    num_queries, num_classes = probs.shape
    k = min(int(topk), num_queries * num_classes)
    top_probs, flat_idx = probs.flatten().topk(k, sorted=True)
    labels = flat_idx % num_classes
    query_ids = torch.div(flat_idx, num_classes, rounding_mode="floor")
    if is_thing is not None:
        thing = torch.as_tensor(list(is_thing), dtype=torch.bool, device=labels.device)
        keep = thing[labels]
        top_probs, labels, query_ids = top_probs[keep], labels[keep], query_ids[keep]
    logits = mask_logits[query_ids].float()
    return _instances(
        mask_logits.shape[-2:],
        logits > 0,
        top_probs * mask_scores(logits),
        pred_classes=labels,
        pred_query_ids=query_ids,
    )


@fp32_island
def panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    is_thing: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[torch.Tensor, list[dict]]:
    """Mask2Former panoptic inference.

    Args:
        class_logits: [Q, K+1]; mask_logits: [Q, H, W]; is_thing: K flags.
    Returns:
        (panoptic_seg int32 [H, W] with 0 = void, segments_info: list of {"id", "isthing",
        "category_id"} with 0-based contiguous category ids). Stuff segments of one class are merged.
    """
    num_classes = class_logits.shape[-1] - 1
    if len(is_thing) != num_classes:
        raise ValueError(f"is_thing has {len(is_thing)} entries but the class logits have K={num_classes}")
    scores, labels = F.softmax(class_logits.float(), dim=-1).max(-1)
    keep = labels.ne(num_classes)
    return panoptic_merge(scores[keep], labels[keep], mask_logits[keep], is_thing, object_mask_threshold,
                          overlap_threshold)


@fp32_island
def panoptic_merge(
    scores: torch.Tensor,
    labels: torch.Tensor,
    mask_logits: torch.Tensor,
    is_thing: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[torch.Tensor, list[dict]]:
    """The Mask2Former segment merge of :func:`panoptic_inference` on foreground queries.

    Args:
        scores, labels: [N] class probability and 0-based class of each query (background queries
            already removed); mask_logits: [N, H, W]. The queries may come from several forwards
            (class chunks of a long vocabulary), with labels in the full class list.
    """
    keep = scores > object_mask_threshold
    # sigmoid of the kept queries only (elementwise: the same values as selecting after it)
    cur_scores, cur_classes, cur_masks = scores[keep].float(), labels[keep], mask_logits[keep].float().sigmoid()

    h, w = mask_logits.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_logits.device)
    segments_info: list[dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info

    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment_ids: dict[int, int] = {}
    segment_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        isthing = bool(is_thing[pred_class])
        owned = cur_mask_ids == k
        original = cur_masks[k] >= 0.5
        mask = owned & original
        mask_area, original_area = int(owned.sum()), int(original.sum())
        if mask_area == 0 or original_area == 0 or int(mask.sum()) == 0:
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not isthing:
            if pred_class in stuff_segment_ids:
                panoptic_seg[mask] = stuff_segment_ids[pred_class]
                continue
            stuff_segment_ids[pred_class] = segment_id + 1
        segment_id += 1
        panoptic_seg[mask] = segment_id
        segments_info.append({"id": segment_id, "isthing": isthing, "category_id": pred_class})
    return panoptic_seg, segments_info


@fp32_island
def referring_scores(refer_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """sigmoid(refer logit) * mask score per query: refer_logits [Q, 1] or [Q], mask_logits [Q, H, W] -> [Q]."""
    return refer_logits.float().reshape(-1).sigmoid() * mask_scores(mask_logits)


@fp32_island
def referring_inference(refer_logits: torch.Tensor, mask_logits: torch.Tensor) -> Instances:
    """The top-1 query: ``Instances`` with pred_masks bool [1, H, W], scores [1], pred_query_ids [1]."""
    scores = referring_scores(refer_logits, mask_logits)
    q = scores.argmax().view(1)
    return _instances(mask_logits.shape[-2:], mask_logits[q].float() > 0, scores[q], pred_query_ids=q)


@fp32_island
def gres_inference(
    refer_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    score_threshold: float = 0.6,
    no_target: str = "top1",
) -> tuple[Instances, bool]:
    """Generalized referring: the union of the query masks with score > ``score_threshold``.

    When no query passes: ``no_target="top1"`` (official) returns the top-1 mask; ``"empty"``
    returns no mask and ``no_target=True``.

    Returns:
        (``Instances`` with pred_masks bool [1, H, W] (or [0, H, W]) and scores [1] (the best query
        score), whether the model predicts "no target").
    """
    if no_target not in GRES_NO_TARGET_MODES:
        raise ValueError(f"gres no-target mode must be one of {GRES_NO_TARGET_MODES}, got {no_target!r}")
    scores = referring_scores(refer_logits, mask_logits)
    binary = mask_logits.float() > 0
    passed = scores > score_threshold
    image_size = mask_logits.shape[-2:]
    if bool(passed.any()):
        union = binary[passed].any(dim=0, keepdim=True)
        return _instances(image_size, union, scores[passed].max().view(1)), False
    if no_target == "top1":
        q = scores.argmax().view(1)
        return _instances(image_size, binary[q], scores[q]), False
    empty = torch.zeros((0, *image_size), dtype=torch.bool, device=mask_logits.device)
    return _instances(image_size, empty, scores.new_zeros(0)), True


@fp32_island
def interactive_scores(region_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """sigmoid(region logit) * mask score: region_logits [R, Q], mask_logits [Q, H, W] -> [R, Q]."""
    return region_logits.float().sigmoid() * mask_scores(mask_logits)[None]


@fp32_island
def interactive_inference(region_logits: torch.Tensor, mask_logits: torch.Tensor) -> Instances:
    """Top-1 query per region (regions may share a query): pred_masks bool [R, H, W], scores [R],
    pred_query_ids [R]."""
    scores = interactive_scores(region_logits, mask_logits)
    if scores.shape[0] == 0:
        best, q = scores.new_zeros(0), torch.zeros(0, dtype=torch.long, device=scores.device)
    else:
        best, q = scores.max(dim=1)
    return _instances(mask_logits.shape[-2:], mask_logits[q].float() > 0, best, pred_query_ids=q)


# ----------------------------------------------------------------------------------------------
# batched entry point
# ----------------------------------------------------------------------------------------------
def _per_sample(x, i: int):
    """Sample i of a batched head output (Tensor [B, ...] or list), or None."""
    if x is None:
        return None
    return x[i]


class PSALMPostProcessor:
    """Predictor outputs + the batch's input dicts -> one detectron2-standard result dict per image.

    Reads from each input dict ``task``, ``padding_mask`` [S, S], ``height``, ``width`` and, for
    ``panoptic``, ``is_thing`` (K flags, in ``class_names`` order).
    """

    @configurable
    def __init__(
        self,
        *,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        detections_per_image: int = 100,
        panoptic_semantic_on: bool = True,
        panoptic_instance_on: bool = True,
        semantic_postprocess_before_inference: bool = False,
        gres_score_threshold: float = 0.6,
        gres_no_target: str = "top1",
    ):
        """
        Args:
            object_mask_threshold, overlap_threshold: panoptic thresholds (Mask2Former: 0.8 / 0.8).
            detections_per_image: instance top-k over Q*K.
            panoptic_semantic_on / panoptic_instance_on: the ``panoptic`` task also returns
                ``sem_seg`` / thing-only ``instances``.
            semantic_postprocess_before_inference: ``semantic`` task: resize the mask logits before
                the class einsum (True) or resize the [K, S, S] result (False, Mask2Former default).
            gres_score_threshold, gres_no_target: see :func:`gres_inference`.
        """
        if gres_no_target not in GRES_NO_TARGET_MODES:
            raise ValueError(f"TEST.PSALM.GREF_NO_TARGET must be one of {GRES_NO_TARGET_MODES}, got {gres_no_target!r}")
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.detections_per_image = detections_per_image
        self.panoptic_semantic_on = panoptic_semantic_on
        self.panoptic_instance_on = panoptic_instance_on
        self.semantic_postprocess_before_inference = semantic_postprocess_before_inference
        self.gres_score_threshold = gres_score_threshold
        self.gres_no_target = gres_no_target

    @classmethod
    def from_config(cls, cfg):
        t = cfg.MODEL.MASK_FORMER.TEST
        return {
            "object_mask_threshold": t.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": t.OVERLAP_THRESHOLD,
            "detections_per_image": t.DETECTIONS_PER_IMAGE,
            "panoptic_semantic_on": t.SEMANTIC_ON,
            "panoptic_instance_on": t.INSTANCE_ON,
            "semantic_postprocess_before_inference": t.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "gres_score_threshold": cfg.TEST.PSALM.GREF_SCORE_THRESHOLD,
            "gres_no_target": cfg.TEST.PSALM.GREF_NO_TARGET,
        }

    @fp32_island
    def __call__(self, outputs: Mapping, batched_inputs: Sequence[Mapping]) -> list[dict]:
        """
        Args:
            outputs: predictor outputs: ``pred_masks`` [B, Q, S/4, S/4]; ``pred_class_logits``
                [B, Q, K+1] (or a list of [Q, K_b+1]); ``pred_refer_logits`` [B, Q, 1];
                ``pred_region_logits`` list of [R_b, Q]. Heads a batch does not use may be None.
            batched_inputs: the B model input dicts (``docs/DESIGN.md``).
        Returns:
            B result dicts (``docs/DESIGN.md``, "Model output").
        """
        pred_masks = outputs["pred_masks"]
        if pred_masks.shape[0] != len(batched_inputs):
            raise ValueError(f"{pred_masks.shape[0]} mask predictions for {len(batched_inputs)} inputs")
        results = []
        for i, inp in enumerate(batched_inputs):
            results.append(
                self.single(
                    inp,
                    pred_masks[i],
                    class_logits=_per_sample(outputs.get("pred_class_logits"), i),
                    refer_logits=_per_sample(outputs.get("pred_refer_logits"), i),
                    region_logits=_per_sample(outputs.get("pred_region_logits"), i),
                )
            )
        return results

    @staticmethod
    def _require(value, name: str, task: str):
        if value is None:
            raise ValueError(f"task {task!r} needs the predictor output {name!r}, which is None")
        return value

    @fp32_island
    def merge_class_chunks(self, inp: Mapping, chunks: Sequence[tuple]) -> dict:
        """Post-process one image predicted in class chunks (a class list over the context,
        :mod:`psalm.inference.class_chunks`) and merge the chunks by score.

        Args:
            inp: the image's input dict with the FULL ``class_names`` (and ``is_thing``).
            chunks: one ``(mask_logits [Q, h, w], class_logits [Q, K_c + 1], class_ids [K_c])`` per
                chunk; ``class_ids`` index the full class list.
        Returns:
            the result dict of :meth:`single` over the full class list:

            * ``instances``: top-k (``detections_per_image``) over the (query, class) pairs of
              every chunk by class probability (each chunk's softmax over its own classes + background);
            * ``sem_seg`` [K, H, W]: each class's map from its chunk;
            * ``panoptic_seg``: :func:`panoptic_merge` over the queries of every chunk.
        """
        task = check_task(inp["task"])
        if task not in CATEGORY_TASKS:
            raise ValueError(f"class chunks are for category tasks, not {task!r}")
        num_classes = len(inp["class_names"])
        padding_mask = inp["padding_mask"]
        input_size = tuple(padding_mask.shape[-2:])
        valid_size = valid_size_from_padding_mask(padding_mask)
        out_size = (int(inp.get("height", valid_size[0])), int(inp.get("width", valid_size[1])))
        topk = int(inp.get("detections_per_image", self.detections_per_image))
        is_thing = inp.get("is_thing")
        if task == "semantic" and not self.semantic_postprocess_before_inference:
            # as single(): each chunk's [K_c, S, S] maps, then resized, into the full class list
            sem = None
            for mask_logits, class_logits, class_ids in chunks:
                dtype = torch.promote_types(mask_logits.dtype, torch.float32)
                up = F.interpolate(mask_logits[None].to(dtype), size=input_size, mode="bilinear", align_corners=False)[0]
                part = sem_seg_postprocess(semantic_inference(class_logits, up), valid_size, *out_size)
                if sem is None:
                    sem = part.new_zeros((num_classes, *part.shape[-2:]))
                sem[torch.as_tensor(list(class_ids), dtype=torch.long, device=part.device)] = part
            return {"sem_seg": sem}
        masks, probs, ids = [], [], []
        for mask_logits, class_logits, class_ids in chunks:
            class_ids = torch.as_tensor(list(class_ids), dtype=torch.long, device=mask_logits.device)
            if class_logits.shape[-1] != len(class_ids) + 1:
                raise ValueError(f"a chunk has {class_logits.shape[-1] - 1} class logits for {len(class_ids)} classes")
            masks.append(resize_mask_logits(mask_logits, input_size, valid_size, out_size).float())
            probs.append(F.softmax(class_logits.float(), dim=-1))
            ids.append(class_ids)
        covered = torch.cat(ids)
        if sorted(covered.tolist()) != list(range(num_classes)):
            raise ValueError(f"the chunks cover classes {sorted(covered.tolist())[:8]}..., not each of the {num_classes} once")
        result = {}
        want_sem = task == "semantic" or (task == "panoptic" and self.panoptic_semantic_on)
        if want_sem:
            sem = masks[0].new_zeros((num_classes, *out_size))
            for m, p, c in zip(masks, probs, ids):
                sem[c] = torch.einsum("qk,qhw->khw", p[:, :-1], m.sigmoid())
            result["sem_seg"] = sem
            if task == "semantic":
                return result
        if task == "panoptic":
            if is_thing is None:
                raise ValueError("panoptic inference needs 'is_thing' in the input dict (see single())")
            sc, lab, ml = [], [], []
            for m, p, c in zip(masks, probs, ids):
                s_, l_ = p.max(-1)
                fg = l_.ne(p.shape[-1] - 1)
                sc.append(s_[fg]), lab.append(c[l_[fg]]), ml.append(m[fg])
            result["panoptic_seg"] = panoptic_merge(torch.cat(sc), torch.cat(lab), torch.cat(ml), is_thing,
                                                    self.object_mask_threshold, self.overlap_threshold)
            if not self.panoptic_instance_on:
                return result
        # instance pairs over every chunk: (class prob, chunk, query, global class)
        dev = masks[0].device
        flat_p, chunk_of, query, label = [], [], [], []
        for j, (p, c) in enumerate(zip(probs, ids)):
            q, k = p.shape[0], p.shape[-1] - 1
            flat_p.append(p[:, :-1].flatten())
            chunk_of.append(torch.full((q * k,), j, dtype=torch.long, device=dev))
            query.append(torch.arange(q, device=dev).repeat_interleave(k))
            label.append(c.to(dev).repeat(q))
        flat_p, chunk_of, query, label = (torch.cat(x) for x in (flat_p, chunk_of, query, label))
        top, order = flat_p.topk(min(topk, flat_p.numel()), sorted=True)
        if task == "panoptic":  # as instance_inference: top-k first, then the thing classes
            keep = torch.as_tensor(list(is_thing), dtype=torch.bool, device=dev)[label[order]]
            top, order = top[keep], order[keep]
        all_masks = torch.cat(masks)  # [C * Q, H, W]
        q_per_chunk = masks[0].shape[0]
        sel = all_masks[chunk_of[order] * q_per_chunk + query[order]]
        result["instances"] = _instances(
            out_size, sel > 0, top * mask_scores(sel), pred_classes=label[order], pred_query_ids=query[order]
        )
        return result

    @fp32_island
    def single(
        self, inp: Mapping, mask_logits: torch.Tensor, class_logits=None, refer_logits=None, region_logits=None
    ) -> dict:
        """Post-process one image: mask_logits [Q, h, w] at stride 4 plus that image's head outputs."""
        task = check_task(inp["task"])
        padding_mask = inp["padding_mask"]
        input_size = tuple(padding_mask.shape[-2:])
        valid_size = valid_size_from_padding_mask(padding_mask)
        out_size = (int(inp.get("height", valid_size[0])), int(inp.get("width", valid_size[1])))

        if task in CATEGORY_TASKS:
            class_logits = self._require(class_logits, "pred_class_logits", task)
        if task == "semantic" and not self.semantic_postprocess_before_inference:
            dtype = torch.promote_types(mask_logits.dtype, torch.float32)
            up = F.interpolate(mask_logits[None].to(dtype), size=input_size, mode="bilinear", align_corners=False)[0]
            sem = semantic_inference(class_logits, up)
            return {"sem_seg": sem_seg_postprocess(sem, valid_size, *out_size)}

        masks = resize_mask_logits(mask_logits, input_size, valid_size, out_size).float()
        if task == "semantic":
            return {"sem_seg": semantic_inference(class_logits, masks)}
        topk = int(inp.get("detections_per_image", self.detections_per_image))
        if task == "instance":
            return {"instances": instance_inference(class_logits, masks, topk)}
        if task == "panoptic":
            is_thing = inp.get("is_thing")
            if is_thing is None:
                raise ValueError(
                    f"panoptic inference needs 'is_thing' (K={class_logits.shape[-1] - 1} bools, class_names "
                    f"order) in the input dict of {inp.get('file_name', 'this image')!r}, which has none. "
                    "PSALMDatasetMapper sets it from MetadataCatalog.get(dataset).prompt_is_thing when built "
                    "with dataset_name= (or is_thing=); PSALMPredictor takes is_thing=[...]; hand-made "
                    "inputs must add it"
                )
            result = {
                "panoptic_seg": panoptic_inference(
                    class_logits, masks, is_thing, self.object_mask_threshold, self.overlap_threshold
                )
            }
            if self.panoptic_semantic_on:
                result["sem_seg"] = semantic_inference(class_logits, masks)
            if self.panoptic_instance_on:
                result["instances"] = instance_inference(class_logits, masks, topk, is_thing=is_thing)
            return result
        if task == "referring":
            return {"instances": referring_inference(self._require(refer_logits, "pred_refer_logits", task), masks)}
        if task == "gres":
            inst, no_target = gres_inference(
                self._require(refer_logits, "pred_refer_logits", task),
                masks,
                self.gres_score_threshold,
                self.gres_no_target,
            )
            return {"instances": inst, "no_target": no_target}
        if task == "interactive":
            return {"instances": interactive_inference(self._require(region_logits, "pred_region_logits", task), masks)}
        raise ValueError(f"task {task!r} has no segmentation post-processing (text tasks are generated)")
