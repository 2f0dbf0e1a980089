"""Semi-supervised video object segmentation by propagation (the DAVIS-2017 protocol of PSALM).

Given the frames of a video and a label map of frame 0 (0 = background, 255 = void, k = object
k), every later frame is segmented as an ``interactive`` task whose visual prompts come from a
**memory**: the image encoding of an earlier frame plus one mask per object on it.

* The memory starts as frame 0 with the given masks.
* Frame t: the region tokens are pooled from the MEMORY frame's image tokens under the memory
  masks (the official code's separate "vp image"); the LLM sequence, the pixel decoder and the
  mask decoder run on frame t.
* Scores ``sigmoid(region logit) * mask score`` [R, Q] (as ``interactive`` inference). Object r
  takes its top-``top_k`` (10) queries by score and keeps the first one no earlier object took
  (greedy unique assignment, :func:`greedy_unique_assignment`).
* The binary masks are painted in object order (later objects overwrite earlier ones) into
  the frame's label map (:func:`psalm.evaluation.davis.paint_objects`).
* The memory moves to frame t (its encoding and its predicted masks) only when no two predicted
  masks overlap with IoU > ``memory_iou_threshold`` (0.4) and, our addition, every object's mask
  is non-empty at the prompt resolution (a region without pixels cannot be pooled; the official
  code does not handle that case). Otherwise the previous memory is kept.

No ground truth beyond frame 0 is read. The official evaluation also reset its memory from
frame-0 ground truth whenever the number of objects in the CURRENT frame's ground truth differed
from the memory (``datasets/build_DAVIS.py`` + ``eval_davis.py``, spec section 4). That uses later
ground truth and is only available as the explicit compat option ``official_gt_reset=True``
(``TEST.PSALM.VIDEO.OFFICIAL_GT_RESET``), which needs the per-frame object lists passed in
``objects_per_frame``; see :meth:`VideoObjectSegmenter.propagate`.

Frame 0 is returned too (its label map is the given mask, restricted to the objects) so that a
writer or the DAVIS evaluator sees every frame.

Usage::

    seg = VideoObjectSegmenter(cfg, model)              # model: an eval-mode PSALM
    label_maps = seg(frame_paths, first_label_map)      # list of uint8 [H, W]
    for r in seg.propagate(frames, first_label_map):    # streaming, with details
        r.label_map, r.masks, r.scores, r.query_ids, r.memory_updated
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable

from psalm.data.mapper import preprocess_image, resize_pad_masks
from psalm.evaluation.davis import paint_objects
from psalm.modeling.postprocessing import interactive_scores, resize_mask_logits
from psalm.utils.image_io import ImageLike, load_image

__all__ = [
    "FrameResult",
    "VideoObjectSegmenter",
    "greedy_unique_assignment",
    "max_pairwise_iou",
    "objects_from_label_map",
]

logger = logging.getLogger(__name__)

VOID_LABEL = 255


# ----------------------------------------------------------------------------- small pieces
def greedy_unique_assignment(scores: torch.Tensor, top_k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per object, distinct across objects, greedily in object order.

    Object r looks at its ``top_k`` best queries (score order) and takes the first one no earlier
    object took (official DAVIS rule). If all of them are taken, it takes its best query not yet
    taken (the official loop then silently reused the previous object's pick; we do not).

    Args:
        scores: [R, Q] per-object query scores (higher is better).
        top_k: candidates per object (clamped to Q).
    Returns:
        (query ids long [R], their scores [R]).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [R, Q], got shape {tuple(scores.shape)}")
    num_objects, num_queries = scores.shape
    if num_objects > num_queries:
        raise ValueError(f"{num_objects} objects but only {num_queries} queries: each object needs its own query")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(int(top_k), num_queries)
    taken: set[int] = set()
    picks = []
    for r in range(num_objects):
        candidates = scores[r].topk(k, sorted=True).indices.tolist()
        pick = next((q for q in candidates if q not in taken), None)
        if pick is None:
            order = scores[r].argsort(descending=True).tolist()
            pick = next(q for q in order if q not in taken)
            logger.debug("object %d: its top-%d queries are all taken; using query %d", r, k, pick)
        taken.add(pick)
        picks.append(pick)
    ids = torch.tensor(picks, dtype=torch.long, device=scores.device)
    return ids, scores[torch.arange(num_objects, device=scores.device), ids]


def max_pairwise_iou(masks: np.ndarray | torch.Tensor) -> float:
    """Largest IoU between two different masks of bool [R, H, W] (0 for R < 2; empty unions count 0)."""
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if m.dim() != 3:
        raise ValueError(f"masks must be [R, H, W], got shape {tuple(m.shape)}")
    if m.shape[0] < 2:
        return 0.0
    flat = m.reshape(m.shape[0], -1).double()
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    iou.fill_diagonal_(0)
    return float(iou.max())


def objects_from_label_map(label_map: np.ndarray, object_ids: Optional[Sequence[int]] = None):
    """Validate a first-frame label map; returns (object ids list, bool masks [R, H, W]).

    Args:
        label_map: integer (or bool) [H, W]; 0 background, 255 void (ignored), other values objects.
        object_ids: the objects to track, in painting order (default: every id present, ascending).
            Each must be an integer in 1..254 with pixels in ``label_map``.
    """
    lab = np.asarray(label_map)
    if lab.ndim != 2:
        raise ValueError(f"the first-frame mask must be a label map [H, W], got shape {lab.shape}")
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"the first-frame label map must hold integer object ids, got dtype {lab.dtype}")
    present = [int(v) for v in np.unique(lab) if v not in (0, VOID_LABEL)]
    if object_ids is None:
        object_ids = present
    object_ids = [int(o) for o in object_ids]
    if not object_ids:
        raise ValueError("the first-frame label map has no object (only 0 = background / 255 = void)")
    bad = [o for o in object_ids if not 1 <= o <= 254]
    if bad:
        raise ValueError(f"object ids must be in 1..254 (0 is background, 255 void), got {bad}")
    if len(set(object_ids)) != len(object_ids):
        raise ValueError(f"object ids must be distinct, got {object_ids}")
    missing = [o for o in object_ids if o not in present]
    if missing:
        raise ValueError(f"object(s) {missing} have no pixel in the first-frame label map (present: {present})")
    return object_ids, np.stack([lab == o for o in object_ids])


@dataclasses.dataclass
class FrameResult:
    """The propagation output of one frame (original frame size H x W, R = number of objects)."""

    frame_index: int
    label_map: np.ndarray  # uint8 [H, W]: 0 background, object id where that object was painted last
    masks: np.ndarray  # bool [R, H, W]: each object's binary mask before painting (may overlap)
    scores: np.ndarray  # float32 [R]: score of the chosen query (1 on frame 0, 0 if not predicted)
    query_ids: np.ndarray  # int64 [R]: chosen query per object (-1 on frame 0 / not predicted)
    object_ids: list  # the R object ids, painting order
    memory_updated: bool  # the memory now holds this frame
    prompt_frame: int  # index of the frame whose encoding + masks were the visual prompts (-1 on frame 0)


@dataclasses.dataclass
class _Memory:
    frame_index: int
    image_tokens: torch.Tensor  # [1, N, H]
    masks: torch.Tensor  # bool [R_m, S, S], padded prompt masks
    object_ids: list


# ----------------------------------------------------------------------------- the segmenter
class VideoObjectSegmenter:
    """Propagate frame-0 object masks through a video with a PSALM model (see module docstring)."""

    @configurable
    def __init__(
        self,
        model,
        *,
        image_size: int,
        pad_value: float = 128.0,
        top_k: int = 10,
        memory_iou_threshold: float = 0.4,
        official_gt_reset: bool = False,
        autocast_dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            model: an eval-mode :class:`psalm.modeling.meta_arch.PSALM` (with a tokenizer).
            image_size, pad_value: the input geometry (``INPUT.IMAGE_SIZE`` / ``INPUT.PAD_VALUE``).
            top_k: candidate queries per object (``TEST.PSALM.VIDEO.TOP_K``, official 10).
            memory_iou_threshold: the memory is not updated when two predicted masks overlap with a
                larger IoU (``TEST.PSALM.VIDEO.MEMORY_IOU_THRESHOLD``, official 0.4).
            official_gt_reset: compat only, reads ground truth of later frames (module docstring;
                ``TEST.PSALM.VIDEO.OFFICIAL_GT_RESET``).
            autocast_dtype: run the model under ``torch.autocast`` with this dtype (None: as is).
        """
        if top_k < 1:
            raise ValueError(f"TEST.PSALM.VIDEO.TOP_K must be >= 1, got {top_k}")
        if not 0.0 <= memory_iou_threshold <= 1.0:
            raise ValueError(f"TEST.PSALM.VIDEO.MEMORY_IOU_THRESHOLD must be in [0, 1], got {memory_iou_threshold}")
        for name in ("encode_images", "forward_segmentation"):
            if not hasattr(model, name):
                raise TypeError(f"model must be a PSALM meta-architecture (no {name}()); got {type(model).__name__}")
        self.model = model
        self.image_size = int(image_size)
        self.pad_value = float(pad_value)
        self.top_k = int(top_k)
        self.memory_iou_threshold = float(memory_iou_threshold)
        self.official_gt_reset = bool(official_gt_reset)
        self.autocast_dtype = autocast_dtype

    @classmethod
    def from_config(cls, cfg, model, autocast_dtype: Optional[torch.dtype] = None):
        v = cfg.TEST.PSALM.VIDEO
        return {
            "model": model,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "pad_value": cfg.INPUT.PAD_VALUE,
            "top_k": v.TOP_K,
            "memory_iou_threshold": v.MEMORY_IOU_THRESHOLD,
            "official_gt_reset": v.OFFICIAL_GT_RESET,
            "autocast_dtype": autocast_dtype,
        }

    # ------------------------------------------------------------------ public API
    def __call__(self, frames: Iterable[ImageLike], first_label_map: np.ndarray, **kwargs) -> list[np.ndarray]:
        """Label maps uint8 [H, W] of every frame (frame 0 first); arguments as :meth:`propagate`."""
        return [r.label_map for r in self.propagate(frames, first_label_map, **kwargs)]

    def propagate(
        self,
        frames: Iterable[ImageLike],
        first_label_map: np.ndarray,
        object_ids: Optional[Sequence[int]] = None,
        objects_per_frame: Optional[Sequence[Sequence[int]]] = None,
    ) -> Iterator[FrameResult]:
        """Segment a video frame by frame (a generator: frames are read and yielded one at a time).

        Args:
            frames: frame 0 first; paths, RGB arrays [H, W, 3] or PIL images, all of one size.
            first_label_map: [H, W] label map of frame 0 (0 background, 255 void, k object k).
            object_ids: objects to track in painting order (default: all ids in the map, ascending).
            objects_per_frame: ground-truth object ids present in each frame. Used ONLY with
                ``official_gt_reset`` (and required then); an error otherwise, so that ground truth
                cannot reach the default protocol by accident.
        Yields:
            one :class:`FrameResult` per frame.
        """
        if self.model.training:
            raise ValueError("the model is in training mode (random region sampling, dropout); call model.eval() first")
        if objects_per_frame is not None and not self.official_gt_reset:
            raise ValueError(
                "objects_per_frame is ground truth of later frames; it is only read with official_gt_reset=True "
                "(TEST.PSALM.VIDEO.OFFICIAL_GT_RESET), the official compat protocol"
            )
        if self.official_gt_reset and objects_per_frame is None:
            raise ValueError("official_gt_reset needs objects_per_frame (the GT object ids present in each frame)")
        object_ids, first_masks = objects_from_label_map(first_label_map, object_ids)
        hw = first_masks.shape[1:]
        first_memory: Optional[_Memory] = None
        memory: Optional[_Memory] = None
        for t, frame in enumerate(frames):
            rgb = load_image(frame)
            if rgb.shape[:2] != hw:
                raise ValueError(
                    f"frame {t} is {rgb.shape[0]}x{rgb.shape[1]} but the first-frame label map is {hw[0]}x{hw[1]}; "
                    "every frame must have the size of the first-frame mask"
                )
            image, padding_mask, new_hw = preprocess_image(rgb, self.image_size, self.pad_value)
            inp = {"image": image, "padding_mask": padding_mask, "height": hw[0], "width": hw[1], "task": "interactive"}
            if t == 0:
                first_memory = memory = self._first_memory(inp, first_masks, object_ids, new_hw)
                yield FrameResult(0, paint_objects(first_masks, object_ids), first_masks,
                                  np.ones(len(object_ids), np.float32), np.full(len(object_ids), -1, np.int64),
                                  list(object_ids), True, -1)
                continue
            prompt = memory
            if self.official_gt_reset:
                prompt = self._official_prompt(memory, first_memory, objects_per_frame, t)
            if prompt is None:  # compat: no object in this frame's GT
                yield self._empty_result(t, hw, object_ids, memory.frame_index)
                continue
            result, candidate = self._step(t, inp, new_hw, prompt, object_ids)
            if candidate is not None:
                memory = candidate
            yield result

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=self.autocast_dtype)

    def _prompt_masks(self, masks: np.ndarray, new_hw) -> torch.Tensor:
        """bool [R, H, W] at the frame size -> [R, S, S] (the mapper's nearest resize + padding)."""
        return resize_pad_masks(masks, new_hw, self.image_size)

    @torch.no_grad()
    def _first_memory(self, inp, first_masks, object_ids, new_hw) -> _Memory:
        masks = self._prompt_masks(first_masks, new_hw)
        vanished = [o for o, m in zip(object_ids, masks) if not bool(m.any())]
        if vanished:
            raise ValueError(
                f"object(s) {vanished} of the first frame have no pixel after resizing the frame to "
                f"INPUT.IMAGE_SIZE={self.image_size}; such tiny objects cannot be used as visual prompts"
            )
        with self._autocast():
            tokens = self.model.encode_images([inp], with_pixel_decoder=False)["image_tokens"]
        return _Memory(0, tokens, masks, list(object_ids))

    def _official_prompt(self, memory: _Memory, first: _Memory, objects_per_frame, t: int) -> Optional[_Memory]:
        """Compat: frame-0 GT prompts of the objects in frame t's GT when their count differs from the memory."""
        if t >= len(objects_per_frame):
            raise ValueError(f"objects_per_frame has {len(objects_per_frame)} entries; frame {t} has none")
        present = {int(o) for o in objects_per_frame[t]}
        if len(present) == len(memory.object_ids):
            return memory
        keep = [i for i, o in enumerate(first.object_ids) if o in present]
        if not keep:
            return None
        logger.debug("frame %d: %d objects in the GT, memory has %d: reset to frame-0 GT prompts", t, len(present),
                     len(memory.object_ids))
        return _Memory(0, first.image_tokens, first.masks[keep], [first.object_ids[i] for i in keep])

    def _empty_result(self, t, hw, object_ids, prompt_frame) -> FrameResult:
        n = len(object_ids)
        return FrameResult(t, np.zeros(hw, np.uint8), np.zeros((n, *hw), bool), np.zeros(n, np.float32),
                           np.full(n, -1, np.int64), list(object_ids), False, prompt_frame)

    @torch.no_grad()
    def _step(self, t: int, inp: dict, new_hw, prompt: _Memory, object_ids) -> tuple[FrameResult, Optional[_Memory]]:
        """Segment frame t from the prompt memory; returns (result, new memory or None)."""
        model = self.model
        inp = dict(inp, region_masks=prompt.masks)  # the prompt builder reads R from it
        with self._autocast():
            feats = model.encode_images([inp])
            feats["region_image_tokens"] = prompt.image_tokens  # prompts pooled from the MEMORY frame
            out = model.forward_segmentation([inp], image_features=feats).outputs
        hw = (inp["height"], inp["width"])
        masks = resize_mask_logits(out["pred_masks"][0], (self.image_size, self.image_size), new_hw, hw).float()
        scores = interactive_scores(out["pred_region_logits"][0], masks)  # [R_p, Q]
        query_ids, picked = greedy_unique_assignment(scores, self.top_k)
        pred = (masks[query_ids] > 0).cpu().numpy()  # [R_p, H, W]

        # per-object arrays over ALL objects (compat resets may predict a subset)
        n = len(object_ids)
        all_masks = np.zeros((n, *hw), bool)
        all_scores = np.zeros(n, np.float32)
        all_q = np.full(n, -1, np.int64)
        pos = {o: i for i, o in enumerate(object_ids)}
        for j, o in enumerate(prompt.object_ids):
            all_masks[pos[o]] = pred[j]
            all_scores[pos[o]] = float(picked[j])
            all_q[pos[o]] = int(query_ids[j])
        label = paint_objects(pred, prompt.object_ids)

        new_masks = self._prompt_masks(pred, new_hw)
        iou = max_pairwise_iou(pred)
        empty = [o for o, m in zip(prompt.object_ids, new_masks) if not bool(m.any())]
        ok = iou <= self.memory_iou_threshold and not empty
        if not ok:
            logger.debug("frame %d: memory kept at frame %d (max pairwise IoU %.3f, empty objects %s)", t,
                         prompt.frame_index, iou, empty)
        result = FrameResult(t, label, all_masks, all_scores, all_q, list(object_ids), ok, prompt.frame_index)
        memory = _Memory(t, feats["image_tokens"], new_masks, list(prompt.object_ids)) if ok else None
        return result, memory
