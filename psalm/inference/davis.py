"""Run :class:`~psalm.inference.video.VideoObjectSegmenter` over a DAVIS-style data set and evaluate it.

Input: the dataset dicts of ``davis17_val`` (``docs/DESIGN.md``, "Dataset dicts"; one per frame,
frame 0 included). What is read from them:

* every frame: ``video_name``, ``frame_index``, ``file_name`` (the image), ``sample_id``;
* frame 0 only: ``object_ids``, ``height``, ``width`` and ``annotations`` (the frame-0 objects'
  ``visual_prompts["mask"]`` RLEs, the first-frame reference);
* ``objects_in_frame`` of every frame ONLY with ``official_gt_reset`` (compat; ground truth).

Nothing else: the annotations of later frames are never touched (tests/test_video.py checks it).
Each frame's painted label map goes to the evaluator as ``instances.pred_masks`` [R, H, W] with
region r = object ``object_ids[r]`` (the DAVIS evaluator's input, psalm/evaluation/davis.py),
frame 0 included, so its optional PNG writer produces every frame.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np
import torch
from detectron2.structures import Instances
from detectron2.utils import comm
from tqdm import tqdm

from psalm.structures.masks import decode_rle
from psalm.evaluation.davis import paint_objects

from .video import VideoObjectSegmenter

__all__ = ["group_videos", "first_frame_label_map", "inference_on_davis"]

logger = logging.getLogger(__name__)


def group_videos(dataset_dicts: Sequence[Mapping]) -> list[tuple[str, list[Mapping]]]:
    """Per-frame dicts -> [(video name, its dicts in frame order)], videos in first-seen order.

    Raises when a video's frame indices are not exactly 0..n-1.
    """
    videos: "OrderedDict[str, list]" = OrderedDict()
    for d in dataset_dicts:
        if "video_name" not in d or "frame_index" not in d:
            raise ValueError(
                "video data set dicts need 'video_name' and 'frame_index' (DAVIS layout, docs/DESIGN.md); "
                f"got keys {sorted(d)}"
            )
        videos.setdefault(d["video_name"], []).append(d)
    out = []
    for name, frames in videos.items():
        frames = sorted(frames, key=lambda d: d["frame_index"])
        idx = [int(d["frame_index"]) for d in frames]
        if idx != list(range(len(frames))):
            raise ValueError(f"video {name!r}: frame indices must be 0..{len(frames) - 1} without gaps, got {idx[:10]}")
        out.append((name, frames))
    return out


def first_frame_label_map(record: Mapping) -> tuple[np.ndarray, list[int]]:
    """Frame-0 label map uint8 [H, W] and the object ids (region order) from the frame-0 dict."""
    object_ids = [int(o) for o in record["object_ids"]]
    anns = record["annotations"]
    by_id = {int(a["object_id"]): a for a in anns}
    if sorted(by_id) != sorted(object_ids):
        raise ValueError(
            f"{record.get('sample_id')}: frame-0 annotations are objects {sorted(by_id)}, object_ids says {object_ids}"
        )
    hw = (int(record["height"]), int(record["width"]))
    masks = []
    for o in object_ids:
        rle = (by_id[o].get("visual_prompts") or {}).get("mask")
        if rle is None:
            raise ValueError(f"{record.get('sample_id')}: object {o} has no visual_prompts['mask'] (the first-frame mask)")
        m = decode_rle(rle)
        if m.shape != hw:
            raise ValueError(f"{record.get('sample_id')}: mask of object {o} is {m.shape}, the frame is {hw}")
        masks.append(m)
    return paint_objects(np.stack(masks), object_ids), object_ids


def inference_on_davis(
    segmenter: VideoObjectSegmenter,
    dataset_dicts: Sequence[Mapping],
    evaluator,
    shard_videos: bool = True,
):
    """Propagate every video and feed the frames to ``evaluator``; returns ``evaluator.evaluate()``.

    Args:
        segmenter: the propagation (its ``official_gt_reset`` decides whether ``objects_in_frame``
            is read).
        dataset_dicts: per-frame dicts (module docstring).
        evaluator: a detectron2 ``DatasetEvaluator`` taking ``process([{"sample_id"}], [{"instances"}])``,
            e.g. :class:`psalm.evaluation.DAVISEvaluator`.
        shard_videos: in a distributed run, rank i processes videos i, i + W, ... (the evaluator
            gathers the ranks' statistics).
    Returns:
        the evaluator's results (``{}`` on non-main ranks, as detectron2's ``inference_on_dataset``).
    """
    videos = group_videos(dataset_dicts)
    if shard_videos and comm.get_world_size() > 1:
        videos = videos[comm.get_rank() :: comm.get_world_size()]
    evaluator.reset()
    n_frames = sum(len(f) for _, f in videos)
    logger.info("Propagating %d video(s), %d frames%s", len(videos), n_frames,
                " (official_gt_reset: reads later-frame GT object lists)" if segmenter.official_gt_reset else "")
    with tqdm(total=n_frames, desc="DAVIS", disable=not comm.is_main_process()) as bar:
        for name, frames in videos:
            label0, object_ids = first_frame_label_map(frames[0])
            per_frame = [d["objects_in_frame"] for d in frames] if segmenter.official_gt_reset else None
            results = segmenter.propagate([d["file_name"] for d in frames], label0, object_ids=object_ids,
                                          objects_per_frame=per_frame)
            updates = 0
            for rec, res in zip(frames, results):
                masks = torch.from_numpy(np.stack([res.label_map == o for o in object_ids]))
                inst = Instances(res.label_map.shape)
                inst.pred_masks = masks
                inst.scores = torch.from_numpy(res.scores)
                evaluator.process([{"sample_id": rec["sample_id"]}], [{"instances": inst}])
                updates += int(res.memory_updated and res.frame_index > 0)
                bar.update(1)
            logger.info("video %s: %d frames, memory updated on %d of %d", name, len(frames), updates,
                        len(frames) - 1)
    results = evaluator.evaluate()
    return results if results is not None else {}
