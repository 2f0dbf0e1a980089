"""DAVIS-2017 semi-supervised VOS metrics J (region IoU), F (boundary F-measure) and J&F.

Our implementation of the DAVIS-2017 protocol (Pont-Tuset et al. 2017; the official toolkit
``davis2017-evaluation``):

* objects of a video = the ids in its first-frame annotation; predictions are painted in object
  order (later objects overwrite earlier ones), so every pixel belongs to at most one object;
* the first and the last frame of every video are not scored; void pixels (255) are ignored;
* J = |P & G| / |P | G| (1 when both are empty); F = boundary F-measure with a tolerance of
  ``ceil(0.008 * image diagonal)`` pixels (disk dilation of 1-pixel boundary maps);
* per object over its scored frames: mean M, recall R = share of frames > 0.5, decay D = mean of
  the first quarter minus mean of the last quarter (4 bins of ``linspace``); reported numbers
  are the means over all objects of all videos, in percent; ``J&F-Mean`` = (J-Mean + F-Mean) / 2.

Output per frame: ``instances.pred_masks`` [R, H, W], region r = object ``object_ids[r]`` of the
dataset dict. With ``output_dir``, the painted label maps are also written as DAVIS palette PNGs
``<output_dir>/davis_predictions/<video>/<frame>.png`` (for the official toolkit).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

import cv2
import numpy as np
from PIL import Image

from psalm.structures.masks import disk_kernel

from .base import SampleGTEvaluator
from .masks import pred_masks_to_numpy

BOUNDARY_THRESHOLD = 0.008


# ----------------------------------------------------------------------------- measures
def region_similarity(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: IoU of two bool masks [H, W] outside ``void``; 1.0 when the union is empty."""
    valid = ~void if void is not None else np.ones_like(gt, dtype=bool)
    inter = np.count_nonzero(pred & gt & valid)
    union = np.count_nonzero((pred | gt) & valid)
    return 1.0 if union == 0 else inter / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """1-pixel boundary of a bool mask [H, W]: pixels whose east, south or south-east neighbour
    differs (the neighbour outside the image counts as background, except along the last row /
    column, which compare only along the edge; the bottom-right pixel is never a boundary)."""
    m = mask.astype(bool)
    east = np.zeros_like(m)
    south = np.zeros_like(m)
    south_east = np.zeros_like(m)
    east[:, :-1] = m[:, 1:]
    south[:-1, :] = m[1:, :]
    south_east[:-1, :-1] = m[1:, 1:]
    b = (m ^ east) | (m ^ south) | (m ^ south_east)
    b[-1, :] = m[-1, :] ^ east[-1, :]
    b[:, -1] = m[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def boundary_f_measure(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
                       bound_th: float = BOUNDARY_THRESHOLD) -> float:
    """F: boundary F-measure of two bool masks [H, W] (tolerance ``bound_th`` x diagonal, or pixels if >= 1)."""
    if void is not None:
        pred = pred & ~void
        gt = gt & ~void
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape))
    pb, gb = boundary_map(pred), boundary_map(gt)
    kernel = disk_kernel(int(radius))
    pb_dil = cv2.dilate(pb.astype(np.uint8), kernel).astype(bool)
    gb_dil = cv2.dilate(gb.astype(np.uint8), kernel).astype(bool)
    n_p, n_g = np.count_nonzero(pb), np.count_nonzero(gb)
    if n_p == 0 and n_g == 0:
        precision = recall = 1.0
    elif n_p == 0:
        precision, recall = 1.0, 0.0
    elif n_g == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = np.count_nonzero(pb & gb_dil) / n_p
        recall = np.count_nonzero(gb & pb_dil) / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def mean_recall_decay(values) -> tuple[float, float, float]:
    """Per-object statistics over its scored frames: mean, recall (share > 0.5), decay."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(np.nanmean(v))
    recall = float(np.nanmean(v > 0.5))
    edges = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    bins = [v[edges[i] : edges[i + 1] + 1] for i in range(4)]
    decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def paint_objects(pred_masks: np.ndarray, object_ids) -> np.ndarray:
    """Label map uint8 [H, W]: object ``object_ids[r]`` where mask r is set, later objects on top."""
    label = np.zeros(pred_masks.shape[1:], dtype=np.uint8)
    for m, oid in zip(pred_masks, object_ids):
        label[m] = oid
    return label


def _davis_palette() -> list[int]:
    """The standard PASCAL / DAVIS colour map (bit-interleaved), as a flat PIL palette."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


# ----------------------------------------------------------------------------- evaluator
class DAVISEvaluator(SampleGTEvaluator):
    """J, F and J&F (mean, recall, decay) for ``davis17_val`` (see module docstring)."""

    task_key = "davis"

    def __init__(self, dataset_name, distributed=True, output_dir=None, bound_th=BOUNDARY_THRESHOLD):
        super().__init__(dataset_name, distributed, output_dir)
        self.bound_th = bound_th

    def _process_one(self, record, inp, out):
        hw = (record["height"], record["width"])
        what = f"{self.dataset_name} frame {record['sample_id']}"
        if "instances" not in out:
            raise KeyError(f"{what}: model output has no 'instances' (expected one mask per object)")
        preds = pred_masks_to_numpy(out["instances"].pred_masks, hw, what)
        oids = record["object_ids"]
        if len(preds) != len(oids):
            raise ValueError(f"{what}: {len(preds)} predicted masks for {len(oids)} objects")
        label = paint_objects(preds, oids)
        if self._output_dir:
            self._write_png(label, record)
        gt = np.asarray(Image.open(record["annotation_file_name"]))
        if gt.shape != hw:
            raise ValueError(f"{what}: annotation {record['annotation_file_name']!r} is {gt.shape}, expected {hw}")
        void = gt == 255
        per_object = {}
        for oid in oids:
            p, g = label == oid, gt == oid
            per_object[int(oid)] = (region_similarity(p, g, void), boundary_f_measure(p, g, void, self.bound_th))
        return {"video": record["video_name"], "t": record["frame_index"], "n": record["num_frames"],
                "objects": per_object}

    def _write_png(self, label, record):
        path = os.path.join(self._output_dir, "davis_predictions", record["video_name"],
                            os.path.basename(record["annotation_file_name"]))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img = Image.fromarray(label)  # mode "L"; putpalette turns it into "P"
        img.putpalette(_davis_palette())
        img.save(path)

    def _summarize(self, stats):
        videos = defaultdict(dict)
        lengths = {}
        for s in stats.values():
            videos[s["video"]][s["t"]] = s["objects"]
            lengths[s["video"]] = s["n"]
        J = {"M": [], "R": [], "D": []}
        F = {"M": [], "R": [], "D": []}
        for video, frames in sorted(videos.items()):
            scored = list(range(1, lengths[video] - 1))
            missing = [t for t in scored if t not in frames]
            if missing:
                raise ValueError(
                    f"DAVIS video {video!r}: no prediction for frame(s) {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                    "every frame but the first and last must be predicted"
                )
            for oid in sorted(frames[scored[0]]) if scored else []:
                j_vals = [frames[t][oid][0] for t in scored]
                f_vals = [frames[t][oid][1] for t in scored]
                for acc, vals in ((J, j_vals), (F, f_vals)):
                    m, r, d = mean_recall_decay(vals)
                    acc["M"].append(m)
                    acc["R"].append(r)
                    acc["D"].append(d)
        res = {}
        for name, acc in (("J", J), ("F", F)):
            res[f"{name}-Mean"] = 100.0 * float(np.mean(acc["M"]))
            res[f"{name}-Recall"] = 100.0 * float(np.mean(acc["R"]))
            res[f"{name}-Decay"] = 100.0 * float(np.mean(acc["D"]))
        res["J&F-Mean"] = (res["J-Mean"] + res["F-Mean"]) / 2
        res["num_objects"] = len(J["M"])
        res["num_videos"] = len(videos)
        return res
