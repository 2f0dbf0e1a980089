"""User visual prompts (interactive segmentation) -> validated regions -> rasters.

The predictor, the demo and the visualiser share this parser, so a prompt is checked once and drawn
where it was rasterised. Coordinates are pixels of the ORIGINAL image, ``x`` to the right, ``y`` down;
a point ``(x, y)`` covers pixel ``(row=floor(y), col=floor(x))``.

One region = one object to segment = one ``<region>`` token of the prompt:

* ``points``: each entry is one point ``(x, y)`` or a list of points ``[(x, y), ...]`` of one object;
* ``scribbles``: each entry is a polyline ``[(x, y), ...]`` (one or more vertices);
* ``boxes``: each entry is ``(x0, y0, x1, y1)`` (XYXY, ``x1 > x0``, ``y1 > y0``); a box partly outside
  the image is clipped to it;
* ``masks``: each entry is an [H, W] mask of the image size (bool, integer != 0, or float >= 0.5),
  or one [R, H, W] array.

Regions are ordered points, scribbles, boxes, masks (in the order given within each kind); the
model returns one mask per region in that order. Rasterisation uses the data set's own
:func:`psalm.data.visual_prompts.rasterize_prompt` (points dilated to disks of ``INPUT.POINT_RADIUS``,
scribbles to ``INPUT.SCRIBBLE_RADIUS``), exactly as stored prompts are rasterised for training.

Every invalid prompt raises :class:`ValueError` saying which region is wrong and how to fix it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import cv2
import numpy as np

from psalm.data.visual_prompts import encode_rle, rasterize_prompt

__all__ = ["RegionPrompt", "parse_visual_prompts", "rasterize_regions"]


@dataclass(frozen=True)
class RegionPrompt:
    """One validated visual prompt.

    Attributes:
        kind: ``"point"``, ``"scribble"``, ``"box"`` or ``"mask"``.
        data: point / scribble: float [n, 2] of (x, y); box: float [4] XYXY (clipped to the image);
            mask: bool [H, W].
    """

    kind: str
    data: np.ndarray


def _xy_array(value, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected numbers (x, y), got {value!r:.80}") from e
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"{what}: expected (x, y) or a list of (x, y), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: coordinates must be finite, got {arr.tolist()}")
    return arr


def _check_inside(xy: np.ndarray, hw: Tuple[int, int], what: str) -> None:
    h, w = hw
    bad = (xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
    if bad.any():
        raise ValueError(
            f"{what}: point(s) {xy[bad].tolist()} lie outside the {w}x{h} (width x height) image; "
            f"coordinates are (x, y) pixels with 0 <= x < {w} and 0 <= y < {h}"
        )


def _as_region_list(value, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list (one entry per region), got {type(value).__name__}")
    return list(value)


def _parse_points(points, hw) -> List[RegionPrompt]:
    out = []
    entries = _as_region_list(points, "points")
    # a flat (x, y) pair is one point, not two regions of one number each
    if len(entries) == 2 and all(np.ndim(v) == 0 for v in entries):
        entries = [entries]
    for i, p in enumerate(entries):
        xy = _xy_array(p, f"points[{i}]")
        _check_inside(xy, hw, f"points[{i}]")
        out.append(RegionPrompt("point", xy))
    return out


def _parse_scribbles(scribbles, hw) -> List[RegionPrompt]:
    out = []
    for i, s in enumerate(_as_region_list(scribbles, "scribbles")):
        xy = _xy_array(s, f"scribbles[{i}]")
        _check_inside(xy, hw, f"scribbles[{i}]")
        out.append(RegionPrompt("scribble", xy))
    return out


def _parse_boxes(boxes, hw) -> List[RegionPrompt]:
    h, w = hw
    out = []
    entries = _as_region_list(boxes, "boxes")
    if len(entries) == 4 and all(np.ndim(v) == 0 for v in entries):
        entries = [entries]
    for i, b in enumerate(entries):
        arr = np.asarray(b, dtype=np.float64).reshape(-1)
        if arr.shape != (4,) or not np.isfinite(arr).all():
            raise ValueError(f"boxes[{i}]: expected 4 finite numbers (x0, y0, x1, y1), got {b!r:.80}")
        x0, y0, x1, y1 = arr
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"boxes[{i}] = {arr.tolist()}: need x1 > x0 and y1 > y0 (XYXY pixel coordinates)")
        clipped = np.array([max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))])
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            raise ValueError(
                f"boxes[{i}] = {arr.tolist()} does not overlap the {w}x{h} (width x height) image"
            )
        out.append(RegionPrompt("box", clipped))
    return out


def _parse_masks(masks, hw) -> List[RegionPrompt]:
    if masks is None:
        return []
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
    out = []
    for i, m in enumerate(_as_region_list(masks, "masks")):
        arr = np.asarray(m)
        if arr.ndim != 2 or tuple(arr.shape) != tuple(hw):
            raise ValueError(
                f"masks[{i}] has shape {arr.shape} but the image is {hw[0]}x{hw[1]} (height x width); "
                "a region mask must be [H, W] at the original image size"
            )
        if np.issubdtype(arr.dtype, np.floating):
            binary = arr >= 0.5
        elif arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
            binary = arr != 0
        else:
            raise ValueError(f"masks[{i}]: unsupported dtype {arr.dtype}; pass a bool mask")
        if not binary.any():
            raise ValueError(f"masks[{i}] has no foreground pixel; give a mask that marks the object")
        out.append(RegionPrompt("mask", binary))
    return out


def parse_visual_prompts(
    image_hw: Tuple[int, int],
    points=None,
    scribbles=None,
    boxes=None,
    masks=None,
) -> List[RegionPrompt]:
    """Validate user prompts against an image of size ``image_hw`` (H, W); see the module docstring.

    Raises:
        ValueError: no prompt at all, or an invalid / out-of-image / empty prompt.
    """
    hw = (int(image_hw[0]), int(image_hw[1]))
    regions = (
        _parse_points(points, hw) + _parse_scribbles(scribbles, hw) + _parse_boxes(boxes, hw) + _parse_masks(masks, hw)
    )
    if not regions:
        raise ValueError(
            "the interactive task needs at least one visual prompt: points=[(x, y)], boxes=[(x0, y0, x1, y1)], "
            "scribbles=[[(x, y), ...]] or masks=[HxW bool array]"
        )
    return regions


def _raw_raster(region: RegionPrompt, hw: Tuple[int, int]) -> np.ndarray:
    """The undilated prompt (as a data set stores it): single pixels, a 1-pixel polyline, a filled box."""
    h, w = hw
    if region.kind == "mask":
        return region.data
    raw = np.zeros((h, w), dtype=np.uint8)
    if region.kind == "point":
        cols = np.floor(region.data[:, 0]).astype(np.int64)
        rows = np.floor(region.data[:, 1]).astype(np.int64)
        raw[rows, cols] = 1
    elif region.kind == "scribble":
        pts = np.floor(region.data).astype(np.int32).reshape(-1, 1, 2)
        if len(pts) == 1:
            raw[pts[0, 0, 1], pts[0, 0, 0]] = 1
        else:
            cv2.polylines(raw, [pts], isClosed=False, color=1, thickness=1, lineType=cv2.LINE_8)
    elif region.kind == "box":
        x0, y0, x1, y1 = region.data
        raw[int(math.floor(y0)) : int(math.ceil(y1)), int(math.floor(x0)) : int(math.ceil(x1))] = 1
    else:
        raise ValueError(f"unknown region kind {region.kind!r}")
    return raw.astype(bool)


def rasterize_regions(
    regions: Sequence[RegionPrompt], image_hw: Tuple[int, int], point_radius: int = 10, scribble_radius: int = 5
) -> np.ndarray:
    """bool [R, H, W] region masks at the original image size, rasterised by the data set rasteriser."""
    hw = (int(image_hw[0]), int(image_hw[1]))
    out = np.zeros((len(regions), *hw), dtype=bool)
    for i, region in enumerate(regions):
        out[i] = rasterize_prompt(region.kind, encode_rle(_raw_raster(region, hw)), point_radius, scribble_radius)
        if not out[i].any():
            raise ValueError(f"region {i} ({region.kind}) rasterised to an empty mask")
    return out
