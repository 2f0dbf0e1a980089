"""Predictions as files a user can keep: a JSON record and a mask label PNG (demos, web app).

* :func:`prediction_record`: a JSON-serialisable dict of one image's prediction: every segment with its
  id, label, score, box and area (panoptic segments, instances, referring / interactive masks, the
  classes present in a semantic map), ``no_target`` for gres, the generated ``text`` for chat;
* :func:`prediction_label_map`: the masks as one integer map [H, W] whose value ``k`` is the pixel's
  segment ``k`` of the record (0: none). Overlapping instance masks: the higher score wins;
* :func:`save_label_map`: that map as an 8-bit PNG (16-bit when there are more than 255 segments).

Both read the model output of ``docs/DESIGN.md`` ("Model output") in original image coordinates.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["prediction_record", "prediction_label_map", "save_label_map"]


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def _box_area(mask: np.ndarray) -> tuple:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None, 0
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], int(len(xs))


def _name(class_names: Optional[Sequence[str]], c) -> Optional[str]:
    if c is None:
        return None
    return class_names[c] if class_names and 0 <= c < len(class_names) else str(c)


def _masks(prediction: Mapping, task: str) -> tuple:
    """(list of bool [H, W] masks, list of per-segment dicts without box / area), in record order."""
    segs: List[dict] = []
    masks: List[np.ndarray] = []
    if task == "panoptic":
        pan, infos = prediction["panoptic_seg"]
        pan = _np(pan)
        for info in infos:
            masks.append(pan == int(info["id"]))
            segs.append({"category_id": int(info["category_id"]), "isthing": bool(info.get("isthing", True)),
                         **({"score": float(info["score"])} if "score" in info else {})})
    elif task == "semantic":
        labels = _np(prediction["sem_seg"].argmax(dim=0))
        for c in np.unique(labels).tolist():
            masks.append(labels == c)
            segs.append({"category_id": int(c)})
    elif task in ("instance", "referring", "gres", "interactive"):
        inst = prediction["instances"]
        m = _np(inst.pred_masks).astype(bool) if inst.has("pred_masks") else np.zeros((0,) + tuple(inst.image_size), bool)
        scores = _np(inst.scores).astype(float).tolist() if inst.has("scores") else [None] * len(m)
        classes = _np(inst.pred_classes).tolist() if inst.has("pred_classes") else [None] * len(m)
        for i in range(len(m)):
            masks.append(m[i])
            seg = {"score": scores[i]}
            if classes[i] is not None:
                seg["category_id"] = int(classes[i])
            if task == "interactive":
                seg["region"] = i
            segs.append(seg)
    return masks, segs


def prediction_record(
    prediction: Mapping,
    task: str,
    *,
    class_names: Optional[Sequence[str]] = None,
    sentence: Optional[str] = None,
    regions: Optional[Sequence] = None,
) -> dict:
    """One image's prediction as a JSON-serialisable dict.

    Returns:
        ``{"task", "image_size": [H, W], "segments": [{"id", "label", "score"?, "category_id"?, "isthing"?,
        "region"?, "bbox": [x0, y0, x1, y1] or None, "area"}], "no_target"?, "text"?}``. Segment ``id`` k
        is the value of its pixels in :func:`prediction_label_map`. ``label``: the class name, the
        sentence (referring / gres) or the prompt kind (interactive, from ``regions``).
    """
    record: dict = {"task": task}
    if "text" in prediction:
        record["text"] = str(prediction["text"])
    masks, segs = _masks(prediction, task)
    if masks:
        record["image_size"] = [int(masks[0].shape[0]), int(masks[0].shape[1])]
    elif "instances" in prediction:
        record["image_size"] = [int(v) for v in prediction["instances"].image_size]
    out = []
    for k, (mask, seg) in enumerate(zip(masks, segs), start=1):
        box, area = _box_area(mask)
        if "category_id" in seg:
            label = _name(class_names, seg["category_id"])
        elif task in ("referring", "gres"):
            label = sentence
        elif task == "interactive" and regions is not None and seg["region"] < len(regions):
            label = getattr(regions[seg["region"]], "kind", None)
        else:
            label = None
        out.append({"id": k, "label": label, **seg, "bbox": box, "area": area})
    record["segments"] = out
    if "no_target" in prediction:
        record["no_target"] = bool(prediction["no_target"])
    return record


def prediction_label_map(prediction: Mapping, task: str) -> Optional[np.ndarray]:
    """The masks of :func:`prediction_record` as one int32 map [H, W] (0: no segment, k: segment k).

    Instance-type masks may overlap: they are painted from the lowest score to the highest, so a
    pixel belongs to its highest-scoring mask. Returns None for a task without masks (chat).
    """
    masks, segs = _masks(prediction, task)
    if not masks:
        if "instances" in prediction:
            return np.zeros(tuple(int(v) for v in prediction["instances"].image_size), np.int32)
        return None
    out = np.zeros(masks[0].shape, np.int32)
    order = range(len(masks))
    if all(s.get("score") is not None for s in segs):
        order = sorted(order, key=lambda i: segs[i]["score"])
    for i in order:
        out[masks[i]] = i + 1
    return out


def save_label_map(label_map: np.ndarray, path: str) -> None:
    """Write a label map as a PNG: 8-bit grey when the ids fit, otherwise 16-bit."""
    from PIL import Image

    if label_map.max(initial=0) < 256:
        Image.fromarray(label_map.astype(np.uint8)).save(path)
    elif label_map.max() < 65536:
        Image.fromarray(label_map.astype(np.uint16)).save(path)
    else:
        raise ValueError(f"{int(label_map.max())} segments do not fit a 16-bit PNG")
