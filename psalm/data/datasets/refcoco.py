"""RefCOCO / RefCOCO+ (unc) and RefCOCOg (umd), in both evaluation protocols.

Prepared files (``datasets/prepare_refcoco.py``): ``refer_seg/<dataset>/<dataset>_<splitBy>_<split>.json``
with COCO-style ``images`` / ``annotations`` and a ``refs`` list (``ref_id``, ``image_id``,
``ann_ids``, ``sentences`` [{``sent_id``, ``sent``}]). Images: ``coco/train2014/``.

Two protocols, two names per split:

* ``<dataset>_<splitBy>_<split>``: one sample per sentence (standard; LISA, LAVT, ...).
* ``<dataset>_<splitBy>_<split>_per_ref``: one sample per referred object with all of its
  sentences (official PSALM; the model merges them as ``''.join(f' {s}.')``, issue #31).

Each dict: ``file_name``, ``height``, ``width``, ``image_id`` (COCO id, shared by many samples),
``sample_id`` (unique str, the evaluator's key), ``ref_id``, ``sent_ids``, ``sentences`` (list[str]),
``annotations`` (the referred objects; empty only for gRefCOCO no-target), ``task``.
gRefCOCO (``grefcoco.py``) uses the same file format and loader with ``task="gres"``.
"""
from __future__ import annotations

import logging
import os

from psalm.data.class_names import load_categories

from ._common import (
    coco_annotation_to_d2,
    contiguous_map,
    datasets_root,
    load_json,
    log_invalid_segmentations,
    log_loaded,
    register_lazy,
    require_path,
)

logger = logging.getLogger(__name__)

REFCOCO_SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
}
PROTOCOLS = ("per_sentence", "per_ref")


def referring_json_path(root: str, dataset: str, split_by: str, split: str) -> str:
    return os.path.join(root, "refer_seg", dataset, f"{dataset}_{split_by}_{split}.json")


def coco2014_image_root(root: str) -> str:
    return os.path.join(root, "coco", "train2014")


def referring_metadata() -> dict:
    cats = load_categories("coco_instance")
    return {
        "thing_classes": [c["name"] for c in cats],
        "thing_dataset_id_to_contiguous_id": contiguous_map(c["id"] for c in cats),
    }


def load_referring_json(
    json_file: str,
    image_root: str,
    dataset_name: str,
    protocol: str,
    task: str,
    prepare: str,
    sample_prefix: str = "",
) -> list[dict]:
    """Our prepared referring JSON -> one dict per sentence (``per_sentence``) or per ref (``per_ref``).

    ``task="gres"`` adds ``no_target`` (True when the ref has no referred object).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"referring protocol must be one of {PROTOCOLS}, got {protocol!r}")
    data = load_json(json_file, dataset_name, prepare)
    require_path(image_root, dataset_name, "download COCO train2014 images (datasets/README.md)", is_dir=True)
    id_map = referring_metadata()["thing_dataset_id_to_contiguous_id"]
    images = {img["id"]: img for img in data["images"]}
    anns = {a["id"]: a for a in data["annotations"]}
    out, n_invalid, n_refs_dropped = [], 0, 0
    for ref in data["refs"]:
        img = images[ref["image_id"]]
        objs = []
        for ann_id in ref["ann_ids"]:
            a = anns[ann_id]
            obj = coco_annotation_to_d2(a, id_map[int(a["category_id"])])
            if obj is None:
                n_invalid += 1
                continue
            objs.append(obj)
        if ref["ann_ids"] and not objs:
            # every referred object was degenerate: not a "no target" sample, a sample without GT
            n_refs_dropped += 1
            continue
        base = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": img["height"],
            "width": img["width"],
            "image_id": img["id"],
            "ref_id": ref["ref_id"],
            "task": task,
        }
        if task == "gres":
            base["no_target"] = len(objs) == 0
        sents = ref["sentences"]
        if not sents:
            raise ValueError(f"Data set '{dataset_name}': ref {ref['ref_id']} in {json_file!r} has no sentence")
        groups = [sents] if protocol == "per_ref" else [[s] for s in sents]
        for group in groups:
            d = dict(base)
            d["sentences"] = [s["sent"] for s in group]
            d["sent_ids"] = [s["sent_id"] for s in group]
            key = f"{ref['ref_id']}" if protocol == "per_ref" else f"{ref['ref_id']}/{group[0]['sent_id']}"
            d["sample_id"] = sample_prefix + key
            # each dict gets its own annotation dicts: no sharing between samples
            d["annotations"] = [dict(o) for o in objs]
            out.append(d)
    log_invalid_segmentations(dataset_name, n_invalid)
    if n_refs_dropped:
        logger.warning("Data set '%s': %d ref(s) left out: none of their objects has a valid segmentation",
                       dataset_name, n_refs_dropped)
    log_loaded(dataset_name, len(out), f"{protocol} samples")
    return out


def _suffix(protocol: str) -> str:
    return "_per_ref" if protocol == "per_ref" else ""


def register_refcoco(root: str | None = None) -> None:
    root = datasets_root(root)
    image_root = coco2014_image_root(root)
    meta = referring_metadata()
    prepare = "python datasets/prepare_refcoco.py"
    for (dataset, split_by), splits in REFCOCO_SPLITS.items():
        for split in splits:
            json_file = referring_json_path(root, dataset, split_by, split)
            for protocol in PROTOCOLS:
                name = f"{dataset}_{split_by}_{split}{_suffix(protocol)}"
                register_lazy(
                    name,
                    lambda name=name, json_file=json_file, protocol=protocol: load_referring_json(
                        json_file, image_root, name, protocol, "referring", prepare
                    ),
                    task="referring",
                    evaluator_type="referring",
                    protocol=protocol,
                    json_file=json_file,
                    image_root=image_root,
                    **meta,
                )

    # official training mix: RefCOCO + RefCOCO+ + RefCOCOg train splits
    parts = [(d, s) for (d, s) in REFCOCO_SPLITS]
    for protocol in PROTOCOLS:
        name = f"refcoco_mixed_train{_suffix(protocol)}"

        def _load_mixed(name=name, protocol=protocol):
            out = []
            for dataset, split_by in parts:
                out += load_referring_json(
                    referring_json_path(root, dataset, split_by, "train"),
                    image_root,
                    name,
                    protocol,
                    "referring",
                    prepare,
                    sample_prefix=f"{dataset}_{split_by}/",
                )
            return out

        register_lazy(
            name, _load_mixed, task="referring", evaluator_type="referring", protocol=protocol,
            image_root=image_root, **meta,
        )
