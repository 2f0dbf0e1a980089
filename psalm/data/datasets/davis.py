"""DAVIS-2017 val, semi-supervised video object segmentation (zero-shot, paper Table 13).

Prepared file (``datasets/prepare_davis.py``): ``DAVIS/davis17_val_psalm.json`` from the DAVIS-2017
trainval tree ``DAVIS/{JPEGImages,Annotations}/480p/<video>/<frame>.{jpg,png}`` and
``DAVIS/ImageSets/2017/val.txt``.

``davis17_val`` yields one dict per frame, videos in order and frames in order (frame 0 included):

* ``file_name``, ``height``, ``width``, ``image_id`` = ``sample_id`` = ``"<video>/<frame>"``,
  ``task="interactive"``, ``video_name``, ``frame_index``, ``num_frames``;
* ``annotation_file_name``: the frame's DAVIS palette PNG (read by the evaluator; 0 = background,
  k = object k, 255 = void);
* ``object_ids``: the video's objects (those in frame 0, ascending), the order of the regions;
* ``objects_in_frame``: object ids present in this frame's GT (the official evaluation used this
  to reset its memory: it is ground truth of the current frame; use it only in ``compat`` runs);
* ``first_frame_file_name`` and ``annotations``: the frame-0 objects, each with ``object_id``,
  ``segmentation`` (RLE) and ``visual_prompts={"mask": RLE}`` (the first-frame reference). The
  evaluation tool replaces the prompts by the previous frame's prediction as it goes.

Region r of a prediction is object ``object_ids[r]``.
"""
from __future__ import annotations

import os

from detectron2.structures import BoxMode

from ._common import datasets_root, load_json, log_loaded, register_lazy, require_path

PREPARE = "python datasets/prepare_davis.py"


def davis_json_path(root: str) -> str:
    return os.path.join(root, "DAVIS", "davis17_val_psalm.json")


def load_davis(json_file: str, davis_root: str, dataset_name: str) -> list[dict]:
    data = load_json(json_file, dataset_name, PREPARE)
    require_path(os.path.join(davis_root, "JPEGImages", "480p"), dataset_name, "download DAVIS-2017 trainval 480p",
                 is_dir=True)
    out = []
    for v in data["videos"]:
        name, frames = v["name"], v["frames"]
        img = lambda f: os.path.join(davis_root, "JPEGImages", "480p", name, f + ".jpg")  # noqa: E731
        for t, f in enumerate(frames):
            anns = [
                {
                    "object_id": o["object_id"],
                    "segmentation": dict(o["segmentation"]),
                    "bbox": list(o["bbox"]),
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": 0,
                    "iscrowd": 0,
                    "visual_prompts": {"mask": dict(o["segmentation"])},
                }
                for o in v["first_frame_objects"]
            ]
            out.append(
                {
                    "file_name": img(f),
                    "height": v["height"],
                    "width": v["width"],
                    "image_id": f"{name}/{f}",
                    "sample_id": f"{name}/{f}",
                    "task": "interactive",
                    "video_name": name,
                    "frame_index": t,
                    "num_frames": len(frames),
                    "annotation_file_name": os.path.join(davis_root, "Annotations", "480p", name, f + ".png"),
                    "object_ids": [o["object_id"] for o in v["first_frame_objects"]],
                    "objects_in_frame": list(v["objects_per_frame"][t]),
                    "first_frame_file_name": img(frames[0]),
                    "annotations": anns,
                }
            )
    log_loaded(dataset_name, len(out), "frames")
    return out


def register_davis(root: str | None = None) -> None:
    root = datasets_root(root)
    davis_root = os.path.join(root, "DAVIS")
    json_file = davis_json_path(root)
    register_lazy(
        "davis17_val",
        lambda: load_davis(json_file, davis_root, "davis17_val"),
        task="interactive", evaluator_type="davis", prompt_type="mask", json_file=json_file, davis_root=davis_root,
        thing_classes=["object"],
    )
