"""Mask formats shared by every layer: COCO RLE dicts, COCO polygon lists, the disk structuring element.

Stored masks and visual prompts are COCO RLE dicts ``{"counts": str, "size": [h, w]}`` (pycocotools).
"""
from typing import Dict

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["valid_polygons", "decode_rle", "rle_area", "encode_rle", "disk_kernel"]


# ----------------------------------------------------------------------------- polygons
def valid_polygons(polygons) -> list:
    """The polygons of a COCO ``segmentation`` list that describe an area: an even number of
    coordinates and at least 3 points (detectron2's ``load_coco_json`` rule).

    Real COCO files contain degenerate ones (a 4-value "polygon" that pycocotools' ``frPyObjects``
    would read as a box, 2-value ones, odd lengths), which the loaders drop with a logged count.
    """
    return [p for p in polygons if len(p) % 2 == 0 and len(p) >= 6]


# ----------------------------------------------------------------------------- RLE
def decode_rle(rle: Dict) -> np.ndarray:
    """COCO RLE (compressed ``counts`` str/bytes, or uncompressed list) -> bool [h, w]."""
    return mask_utils.decode(_to_coco_rle(rle)).astype(bool)


def _to_coco_rle(rle: Dict) -> Dict:
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError(f"expected a COCO RLE dict with 'counts' and 'size', got {type(rle).__name__}: {rle!r:.100}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, h, w)
    if isinstance(counts, str):
        return {"counts": counts.encode("ascii"), "size": [h, w]}
    return rle


def rle_area(rle: Dict) -> int:
    """Number of foreground pixels of a COCO RLE (no decoding)."""
    return int(mask_utils.area(_to_coco_rle(rle)))


def encode_rle(mask: np.ndarray) -> Dict:
    """bool/uint8 [h, w] -> JSON-ready COCO RLE ``{"counts": ascii str, "size": [h, w]}``."""
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects a 2-d mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in rle["size"]]}



# ----------------------------------------------------------------------------- structuring element
def disk_kernel(radius: int) -> np.ndarray:
    """uint8 [2r+1, 2r+1] structuring element: 1 where ``dy^2 + dx^2 <= r^2``."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx <= r * r).astype(np.uint8)
