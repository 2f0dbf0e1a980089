"""Inference procedures built on the PSALM model: video object segmentation by propagation.

* :mod:`psalm.inference.video`: :class:`VideoObjectSegmenter` (the official DAVIS propagation
  protocol, no ground truth beyond frame 0 by default);
* :mod:`psalm.inference.davis`: run it over a DAVIS-style data set and evaluate it (J&F).
"""
from .davis import first_frame_label_map, group_videos, inference_on_davis
from .video import FrameResult, VideoObjectSegmenter, greedy_unique_assignment, max_pairwise_iou, objects_from_label_map

__all__ = [
    "VideoObjectSegmenter",
    "FrameResult",
    "greedy_unique_assignment",
    "max_pairwise_iou",
    "objects_from_label_map",
    "inference_on_davis",
    "group_videos",
    "first_frame_label_map",
]
