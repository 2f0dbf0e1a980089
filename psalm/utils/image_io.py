"""Reading user images into the one format the model pipeline takes: uint8 RGB [H, W, 3].

The predictor and the demo accept a file path, a numpy array or a PIL image. This module only
decodes and converts pixel formats; resizing and padding are done by
:func:`psalm.data.mapper.preprocess_image` (the one preprocessing pipeline).

Conversions (all documented, none silent about failure):

* grayscale [H, W] / [H, W, 1] -> replicated to 3 channels; RGBA [H, W, 4] -> alpha dropped;
* 16-bit (uint16, or PIL ``I;16`` / ``I`` modes) -> 8-bit by ``round(v / 257)`` (65535 -> 255);
* float arrays in [0, 1] -> ``round(v * 255)``; other floats are an error;
* files: EXIF orientation applied; palette / CMYK / LA images converted to RGB.

Errors: :class:`FileNotFoundError` for a missing file, :class:`ValueError` for anything that is not
an image (unreadable file, wrong shape, bool or out-of-range values).
"""
from __future__ import annotations

import os
import pathlib
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageLike", "to_rgb_uint8", "read_image_rgb", "load_image"]

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Any supported dtype -> uint8, values mapped as described in the module docstring."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        raise ValueError("got a bool array; an image must be uint8 (0..255), uint16 or float in [0, 1]")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"float images must hold values in [0, 1] (got range [{np.nanmin(array):.3g}, "
                f"{np.nanmax(array):.3g}]); pass uint8 0..255 or divide by the maximum first"
            )
        return np.round(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(f"integer image values must be in 0..65535, got range [{lo}, {hi}]")
        if array.dtype == np.uint16 or hi > 255:
            # 16-bit -> 8-bit: round(v / 257), exact at 0 and 65535
            return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return array.astype(np.uint8)
    raise ValueError(f"unsupported image dtype {array.dtype}; expected uint8, uint16 or float")


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """An image array -> contiguous uint8 RGB [H, W, 3].

    Args:
        array: [H, W] or [H, W, 1] (grayscale), [H, W, 3] (RGB) or [H, W, 4] (RGBA); dtype uint8,
            uint16 / other integers in 0..65535, or float in [0, 1].
    Raises:
        ValueError: any other shape or dtype, or values out of range.
    """
    if not isinstance(array, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(array).__name__}")
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        channels = array.shape[2]
    elif array.ndim == 2:
        channels = 1
        array = array[:, :, None]
    else:
        raise ValueError(
            f"an image array must be [H, W] (gray), [H, W, 3] (RGB) or [H, W, 4] (RGBA), got shape "
            f"{array.shape}; channel-first arrays must be transposed with .transpose(1, 2, 0)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the image is empty (shape {array.shape})")
    array = _to_uint8(array)
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def _pil_to_rgb_uint8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image)
        if image.mode == "F" and array.size and float(array.max()) > 1.0:
            raise ValueError("32-bit float image with values above 1; save it as 8- or 16-bit first")
        return to_rgb_uint8(array)
    if image.mode == "RGB":
        return np.ascontiguousarray(np.asarray(image))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return to_rgb_uint8(np.asarray(image.convert("RGB")))


def read_image_rgb(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an image file into uint8 RGB [H, W, 3] (EXIF orientation applied).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an image PIL can decode.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _pil_to_rgb_uint8(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {str(path)!r} as an image ({e}); pass a JPEG/PNG/... file") from e


def load_image(image: ImageLike) -> np.ndarray:
    """A path, numpy array or PIL image -> uint8 RGB [H, W, 3] (see module docstring)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image_rgb(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb_uint8(image)
    if isinstance(image, np.ndarray):
        return to_rgb_uint8(image)
    raise ValueError(
        f"unsupported image type {type(image).__name__}; pass a file path, a numpy array [H, W, 3] "
        "(RGB uint8) or a PIL image"
    )
