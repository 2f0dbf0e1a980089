"""Ground-truth masks at original resolution, prediction-mask checks and IoU counts.

Two polygon rasterisers:

* ``"coco"`` (default): pycocotools (``frPyObjects`` + ``merge`` + ``decode``), the COCO standard.
* ``"official"``: what the official PSALM referring / interactive evaluation does
  (``cv2.fillPoly`` after truncating the polygon coordinates to int32); use it to reproduce the
  official numbers exactly (``TEST.PSALM.GT_POLYGON_RASTERIZER``).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from psalm.structures.masks import decode_rle, valid_polygons

RASTERIZERS = ("coco", "official")


def annotation_to_mask(segmentation, height: int, width: int, rasterizer: str = "coco") -> np.ndarray:
    """One COCO ``segmentation`` (polygons, compressed or uncompressed RLE) -> bool [height, width]."""
    if rasterizer not in RASTERIZERS:
        raise ValueError(f"polygon rasterizer must be one of {RASTERIZERS}, got {rasterizer!r}")
    if isinstance(segmentation, list):
        # degenerate polygons (< 3 points, odd length) cover nothing; pycocotools would read a
        # 4-value one as a box. The loaders drop them already (detectron2's rule)
        segmentation = valid_polygons(segmentation)
        if rasterizer == "official":
            out = np.zeros((height, width), dtype=np.uint8)
            for poly in segmentation:
                cv2.fillPoly(out, [np.asarray(poly, dtype=np.int32).reshape(-1, 2)], 1)
            return out.astype(bool)
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        m = mask_utils.decode(rle).astype(bool)
    elif isinstance(segmentation, dict):
        m = decode_rle(segmentation)
    else:
        raise TypeError(f"unsupported segmentation of type {type(segmentation)}")
    if m.shape != (height, width):
        raise ValueError(f"segmentation has size {m.shape}, the image is {(height, width)}")
    return m


def union_mask(annotations: Sequence[dict], height: int, width: int, rasterizer: str = "coco") -> np.ndarray:
    """Union of the annotations' masks, bool [height, width] (all False when there is none)."""
    out = np.zeros((height, width), dtype=bool)
    for ann in annotations:
        out |= annotation_to_mask(ann["segmentation"], height, width, rasterizer)
    return out


def pred_masks_to_numpy(pred_masks, expected_hw: tuple[int, int], what: str) -> np.ndarray:
    """``instances.pred_masks`` (bool / 0-1 integer tensor or array [N, H, W]) -> bool ndarray.

    Raises when the masks are not binary or not at the original image size.
    """
    if isinstance(pred_masks, torch.Tensor):
        pred_masks = pred_masks.detach().to("cpu").numpy()
    pred_masks = np.asarray(pred_masks)
    if pred_masks.ndim != 3:
        raise ValueError(f"{what}: pred_masks must be [N, H, W], got shape {pred_masks.shape}")
    if pred_masks.dtype != bool:
        if not np.issubdtype(pred_masks.dtype, np.integer) or pred_masks.size and pred_masks.max() > 1:
            raise ValueError(
                f"{what}: pred_masks must be binary (bool), got dtype {pred_masks.dtype}; threshold the logits first"
            )
        pred_masks = pred_masks.astype(bool)
    if tuple(pred_masks.shape[1:]) != tuple(expected_hw):
        raise ValueError(
            f"{what}: pred_masks are {tuple(pred_masks.shape[1:])}, the ground truth is {tuple(expected_hw)}; "
            "predictions must be at the original image size (inputs 'height' / 'width')"
        )
    return pred_masks


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Foreground intersection and union pixel counts of two bool masks."""
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def iou_from_counts(inter: int, union: int) -> float:
    """IoU with the official convention: an empty union (both masks empty) counts as 1.0."""
    return 1.0 if union == 0 else inter / union
