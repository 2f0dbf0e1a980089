"""Visual prompts (interactive segmentation): RLE helpers, rasterisation, and prompt generation.

Two jobs, both at the ORIGINAL image resolution:

* ``rasterize_prompt``: what the data mapper does with a stored prompt. Points are dilated to disks
  of radius ``POINT_RADIUS`` (10) and scribbles to radius ``SCRIBBLE_RADIUS`` (5); boxes and masks
  are used as stored. A disk of radius r is ``{(dy, dx): dy^2 + dx^2 <= r^2}`` (the official
  per-pixel ``distance <= radius`` test), applied here with one ``cv2.dilate``.
* ``generate_visual_prompts``: building COCO-Interactive prompts from an instance mask as the
  official builder does (``bulid_COCO_Interactivate.py``; spec section 5.1), seeded through a
  ``numpy.random.Generator``. Point / box / scribble are drawn per connected component with more
  than ``min_area`` (5) pixels; the mask prompt is the Gaussian-blurred (sigma 2) mask thresholded
  at the mean of the blurred map.

Prompt types are named ``point``, ``scribble``, ``box``, ``mask``; stored prompts are COCO RLE dicts
``{"counts": str, "size": [h, w]}``.
"""
from typing import Dict

import cv2
import numpy as np

# the mask formats and the prompt-type names are shared with evaluation and inference (psalm.structures);
# re-exported here for the callers of this module
from psalm.structures.masks import decode_rle, disk_kernel, encode_rle, rle_area, valid_polygons
from psalm.structures.tasks import PROMPT_TYPES

__all__ = [
    "PROMPT_TYPES",
    "decode_rle",
    "valid_polygons",
    "rle_area",
    "encode_rle",
    "disk_kernel",
    "dilate_disk",
    "rasterize_prompt",
    "generate_visual_prompts",
]

_MAX_TRIES = 1000


# ----------------------------------------------------------------------------- rasterisation
def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Union of radius-``radius`` disks centred on every foreground pixel of ``mask``.

    Args:
        mask: bool/uint8 [h, w]. radius: disk radius in pixels (0: unchanged).

    Returns:
        bool [h, w].
    """
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if radius == 0 or not mask.any():
        return mask.astype(bool)
    # the image border does not contribute (cv2's default border value for dilation is -inf)
    return cv2.dilate(mask, disk_kernel(radius)).astype(bool)


def rasterize_prompt(
    prompt_type: str, rle: Dict, point_radius: int = 10, scribble_radius: int = 5
) -> np.ndarray:
    """Decode a stored prompt and dilate points / scribbles: bool [h, w] at the RLE's resolution."""
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"unknown visual prompt type {prompt_type!r}; expected one of {PROMPT_TYPES}")
    mask = decode_rle(rle)
    if prompt_type == "point":
        return dilate_disk(mask, point_radius)
    if prompt_type == "scribble":
        return dilate_disk(mask, scribble_radius)
    return mask


# ----------------------------------------------------------------------------- generation
def _components(mask: np.ndarray, min_area: int):
    """(bbox (r0, c0, r1, c1) end-exclusive, centroid (row, col)) of the 8-connected components with
    more than ``min_area`` pixels, in skimage ``label`` order (raster order of their first pixel)."""
    from skimage.measure import label, regionprops

    return [
        (p.bbox, p.centroid)
        for p in regionprops(label(mask, connectivity=2))
        if p.area > min_area
    ]


def _point_prompt(mask, components, rng) -> np.ndarray:
    out = np.zeros(mask.shape, dtype=bool)
    for (r0, c0, r1, c1), (cr, cc) in components:
        radius = 0.5 * min(r1 - r0, c1 - c0)
        for _ in range(_MAX_TRIES):
            angle = rng.uniform(0.0, 2.0 * np.pi)
            dr = rng.uniform(0.0, radius) * np.cos(angle)
            dc = rng.uniform(0.0, radius) * np.sin(angle)
            row = int(np.clip(int(cr + dr), r0, r1 - 1))
            col = int(np.clip(int(cc + dc), c0, c1 - 1))
            if mask[row, col]:
                out[row, col] = True
                break
    return out


def _mask_prompt(mask) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    blurred = gaussian_filter(mask.astype(np.float64), sigma=2)
    return blurred > blurred.mean()


def _box_prompt(mask, components, rng) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros(mask.shape, dtype=bool)
    for (r0, c0, r1, c1), _ in components:
        scale = rng.uniform(0.9, 1.1)
        dh, dw = (r1 - r0) * (scale - 1.0) / 2.0, (c1 - c0) * (scale - 1.0) / 2.0
        out[max(0, int(r0 - dh)) : min(h, int(r1 + dh)), max(0, int(c0 - dw)) : min(w, int(c1 + dw))] = True
    return out


def _box_iou_inclusive(a, b) -> float:
    """IoU of (r0, c0, r1, c1) boxes counting both end rows/cols (official ``calculate_iou``)."""
    inter = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1) * max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / float(area_a + area_b - inter)


def _scribble_prompt(mask, components, rng) -> np.ndarray:
    from skimage.draw import line

    h, w = mask.shape
    out = np.zeros(mask.shape, dtype=bool)
    for box, (cr, cc) in components:
        r0, c0, r1, c1 = box

        def jittered():
            nh, nw = (r1 - r0) * rng.uniform(0.5, 1.2), (c1 - c0) * rng.uniform(0.5, 1.2)
            return (max(int(cr - nh / 2), 0), max(int(cc - nw / 2), 0),
                    min(int(cr + nh / 2), h), min(int(cc + nw / 2), w))

        new_box = jittered()
        for _ in range(_MAX_TRIES):
            if _box_iou_inclusive(new_box, box) >= 0.5:
                break
            new_box = jittered()
        else:
            continue  # no acceptable box: this component gets no scribble (official)
        nr0, nc0, nr1, nc1 = new_box
        # a random corner to the opposite corner
        corner = int(rng.integers(4))
        start_row, start_col = (nr0, nr0, nr1, nr1)[corner], (nc0, nc1, nc0, nc1)[corner]
        end_row = nr1 if start_row == nr0 else nr0
        end_col = nc1 if start_col == nc0 else nc0
        rr, cc_line = line(start_row, start_col, end_row, end_col)
        amplitude = rng.uniform(10.0, 20.0)
        frequency = rng.uniform(0.2, 1.0)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        t = np.linspace(0.0, 1.0, len(rr))
        rows = rr.astype(np.float32) + amplitude * np.sin(2.0 * np.pi * frequency * t + phase)
        rows = np.clip(rows, 0, h - 1).astype(np.int32)
        cols = np.clip(cc_line, 0, w - 1).astype(np.int32)
        out[rows, cols] = True
    return out


def generate_visual_prompts(
    mask: np.ndarray, rng: np.random.Generator, min_area: int = 5
) -> Dict[str, Dict]:
    """COCO-Interactive prompts for one instance mask (official builder semantics, our own code).

    Args:
        mask: bool/uint8 [h, w] instance mask at the original image resolution.
        rng: ``numpy.random.Generator``; the same seed gives the same prompts.
        min_area: components with at most this many pixels get no point / box / scribble.

    Returns:
        ``{type: RLE}`` for the NON-EMPTY prompt types among ``point`` (one pixel per component),
        ``scribble`` (1-pixel sine-perturbed diagonal per component, undilated), ``box`` (filled,
        scaled by U(0.9, 1.1) about the bbox centre) and ``mask`` (blurred and re-thresholded).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng)}")
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-d [h, w], got shape {mask.shape}")
    components = _components(mask, min_area)
    prompts = {
        "point": _point_prompt(mask, components, rng),
        "mask": _mask_prompt(mask),
        "box": _box_prompt(mask, components, rng),
        "scribble": _scribble_prompt(mask, components, rng),
    }
    return {name: encode_rle(prompts[name]) for name in PROMPT_TYPES if prompts[name].any()}
