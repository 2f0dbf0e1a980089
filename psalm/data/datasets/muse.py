"""MUSE (PixelLM's multi-target reasoning segmentation data; also a member of Pixel-SAIL's mixture).

Released files (no prepare step: download them, licences apply): ``muse/muse_<split>.json`` (PixelLM's
names) or ``muse/MUSE_<split>.json`` (Pixel-SAIL's names), ``split`` in ``train``, ``val``,
``test_less``, ``test_many``. Images: COCO (``coco/train2014/`` for records with ``file_name``,
``coco/{train,val}2017/`` for records with an LVIS-style ``coco_url``).

Released format (PixelLM spec A2.5): a JSON list, one dict per image: ``file_name`` (or ``coco_url``),
``height``, ``width``, ``ann_list`` (LVIS-style annotations: ``segmentation`` polygons or RLE, ``bbox``
XYWH, ``category_id``, ``category_name``, optional ``rephrased_name``), ``questions`` (list[str]),
``answers`` (one list of annotation dicts per question: that question's targets, in answer order) and
optional ``text_answers`` (one str or None per question, with one ``{seg}`` after each target phrase).

| name | task | evaluator |
|---|---|---|
| ``muse_{train,val,test_less,test_many}`` | ``muse`` (not a psalm task: the projects map it) | ``muse`` (PixelLM's metric) |

Dataset dict (one per image with at least one usable question): ``file_name``, ``height`` H,
``width`` W, ``image_id`` (the record's ``id``, else its index), ``sample_id`` (str of it), ``task``
(``"muse"``), ``questions`` (list[str], Q), ``targets`` (Q lists of annotation dicts, answer order:
the released fields plus ``name`` (:func:`target_name`), ``segmentation`` (polygons with the degenerate
ones dropped, or an RLE dict of size [H, W]) and ``bbox_mode`` when a ``bbox`` is given) and
``text_answers`` (Q entries, str with one ``{seg}`` per target, or None when the release has none).

Questions the loader drops (counted and logged, never an error; official rule for the first):
``seg_count_mismatch`` (a text answer whose ``{seg}`` count differs from its targets), ``no_target``
(an empty answer list) and ``invalid_segmentation`` (a target whose polygons are all degenerate).
A malformed record (missing field, questions / answers / text answers of different lengths, a target
without ``segmentation``, an RLE of another size than the image) is a ``ValueError`` naming the file,
the record and the question.
"""
from __future__ import annotations

import logging
import os

from detectron2.structures import BoxMode

from psalm.structures.masks import valid_polygons

from ._common import datasets_root, load_json, log_loaded, register_lazy

__all__ = ["MUSE_SPLITS", "MUSE_TASK", "SEG_PLACEHOLDER", "load_muse_json", "muse_records_to_dicts", "muse_json_path",
           "target_name", "seg_count_matches", "check_seg_count", "muse_image_path", "register_muse"]

logger = logging.getLogger(__name__)

MUSE_SPLITS = ("train", "val", "test_less", "test_many")
MUSE_TASK = "muse"
SEG_PLACEHOLDER = "{seg}"  # one per target in a released text answer, in target order
DROP_REASONS = ("seg_count_mismatch", "no_target", "invalid_segmentation")
PREPARE = ("download the released MUSE JSON files (PixelLM's release) as muse/muse_<split>.json or "
           "muse/MUSE_<split>.json (datasets/README.md, 'MUSE')")


def seg_count_matches(text_answer: str | None, num_targets: int) -> bool:
    """Whether a text answer holds one ``{seg}`` per target (None, no text answer, always matches).

    The loader drops a question that fails it (``seg_count_mismatch``); the projects' answer builders
    raise (:func:`check_seg_count`).
    """
    return text_answer is None or text_answer.count(SEG_PLACEHOLDER) == num_targets


def check_seg_count(text_answer: str | None, num_targets: int) -> None:
    """:func:`seg_count_matches` or a ``ValueError`` giving both counts and the answer."""
    if not seg_count_matches(text_answer, num_targets):
        raise ValueError(f"text answer has {text_answer.count(SEG_PLACEHOLDER)} {SEG_PLACEHOLDER} for "
                         f"{num_targets} targets: {text_answer!r}")


def target_name(ann: dict) -> str:
    """The phrase of a target: ``rephrased_name`` when present, else ``name`` / ``category_name``."""
    for key in ("rephrased_name", "name", "category_name"):
        if ann.get(key):
            return str(ann[key])
    raise ValueError(f"annotation has no rephrased_name / name / category_name: {sorted(ann)}")


def muse_json_path(directory: str, split: str) -> str:
    """``<directory>/muse_<split>.json``, or the Pixel-SAIL name ``MUSE_<split>.json`` when only that exists."""
    path = os.path.join(str(directory), f"muse_{split}.json")
    alt = os.path.join(str(directory), f"MUSE_{split}.json")
    return alt if not os.path.isfile(path) and os.path.isfile(alt) else path


def muse_image_path(rec: dict, image_root: str, coco_root: str | None = None) -> str:
    """The image of a record: ``<image_root>/<file_name>``, else (LVIS-style ``coco_url``)
    ``<coco_root>/{train2017,val2017}/<basename>`` (``coco_root`` default ``image_root``)."""
    if rec.get("file_name"):
        return os.path.join(image_root, rec["file_name"])
    url = rec.get("coco_url")
    if not url:
        raise ValueError("a MUSE record needs 'file_name' or 'coco_url'")
    split = "train2017" if "train2017" in url else "val2017"
    return os.path.join(image_root if coco_root is None else coco_root, split, url.rsplit("/", 1)[-1])


def _target(ann, height: int, width: int, where: str) -> dict | None:
    """One target annotation as a dataset-dict annotation (see the module doc); None when every polygon is
    degenerate (the question is dropped)."""
    if not isinstance(ann, dict):
        raise ValueError(f"{where}: a target must be an annotation dict, got {type(ann).__name__}")
    if "segmentation" not in ann:
        raise ValueError(f"{where}: target has no 'segmentation' (keys: {sorted(ann)})")
    segm = ann["segmentation"]
    if isinstance(segm, list):
        segm = [list(p) for p in valid_polygons(segm)]
        if not segm:
            return None
    elif isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            raise ValueError(f"{where}: RLE segmentation needs 'counts' and 'size', got keys {sorted(segm)}")
        if [int(v) for v in segm["size"]] != [height, width]:
            raise ValueError(f"{where}: RLE size {list(segm['size'])} differs from the image size {[height, width]}")
    else:
        raise ValueError(f"{where}: segmentation must be polygons (list) or RLE (dict), got {type(segm).__name__}")
    out = dict(ann, segmentation=segm, name=target_name(ann))
    if "bbox" in ann:
        out["bbox_mode"] = BoxMode.XYWH_ABS
    return out


def muse_records_to_dicts(records, image_root: str, coco_root: str | None = None,
                          source: str = "MUSE") -> tuple[list[dict], dict]:
    """Released records -> dataset dicts (module doc). Returns (dicts, dropped questions per reason).

    Args:
        records: the released JSON list.
        image_root: folder of the ``file_name`` images; ``coco_root``: folder with ``train2017`` /
            ``val2017`` for the ``coco_url`` records (default ``image_root``).
        source: the file or data set named in error messages.
    """
    if not isinstance(records, list):
        raise ValueError(f"{source}: a MUSE file is a JSON list of image records, got {type(records).__name__}")
    out, dropped = [], dict.fromkeys(DROP_REASONS, 0)
    for i, rec in enumerate(records):
        where = f"{source}: record {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where} is a {type(rec).__name__}, not a dict")
        for key in ("height", "width", "questions", "answers"):
            if key not in rec:
                raise ValueError(f"{where} has no {key!r} (keys: {sorted(rec)})")
        if not rec.get("file_name") and not rec.get("coco_url"):
            raise ValueError(f"{where} needs 'file_name' or 'coco_url' (keys: {sorted(rec)})")
        height, width = int(rec["height"]), int(rec["width"])
        if height <= 0 or width <= 0:
            raise ValueError(f"{where}: image size {height}x{width} is not positive")
        questions, answers = rec["questions"], rec["answers"]
        if len(answers) != len(questions):
            raise ValueError(f"{where}: {len(questions)} questions but {len(answers)} answers")
        text_answers = rec.get("text_answers") or [None] * len(questions)
        if len(text_answers) != len(questions):
            raise ValueError(f"{where}: {len(questions)} questions but {len(text_answers)} text_answers")
        qs, ts, tas = [], [], []
        for j, (q, targets, ta) in enumerate(zip(questions, answers, text_answers)):
            if not isinstance(q, str):
                raise ValueError(f"{where}, question {j}: the question is a {type(q).__name__}, not a str")
            if ta is not None and not isinstance(ta, str):
                raise ValueError(f"{where}, question {j}: text answer is a {type(ta).__name__}, not a str or null")
            if not targets:
                dropped["no_target"] += 1
                continue
            if not seg_count_matches(ta, len(targets)):
                dropped["seg_count_mismatch"] += 1  # official: the question is skipped
                continue
            converted = [_target(a, height, width, f"{where}, question {j}, target {k}") for k, a in enumerate(targets)]
            if any(t is None for t in converted):
                dropped["invalid_segmentation"] += 1  # answer order would no longer match the targets
                continue
            qs.append(q), ts.append(converted), tas.append(ta)
        if qs:
            image_id = rec.get("id", i)
            out.append({"file_name": muse_image_path(rec, image_root, coco_root), "height": height, "width": width,
                        "image_id": image_id, "sample_id": str(image_id), "task": MUSE_TASK, "questions": qs,
                        "targets": ts, "text_answers": tas})
    return out, dropped


def load_muse_json(json_file, image_root, dataset_name: str | None = None, coco_root=None,
                   prepare: str = PREPARE) -> list[dict]:
    """A released MUSE file -> dataset dicts (:func:`muse_records_to_dicts`); the dropped questions are logged.

    A missing file is a :class:`~psalm.data.datasets.MissingDatasetFileError` (a ``FileNotFoundError``)
    naming ``prepare``.
    """
    name = dataset_name or str(json_file)
    records = load_json(str(json_file), name, prepare)
    dicts, dropped = muse_records_to_dicts(records, str(image_root), None if coco_root is None else str(coco_root),
                                           source=f"{name} ({json_file})" if dataset_name else str(json_file))
    n_questions = sum(len(d["questions"]) for d in dicts)
    if any(dropped.values()):
        logger.warning("Data set '%s': dropped %d question(s) of %s: %s", name, sum(dropped.values()), json_file,
                       {k: v for k, v in dropped.items() if v})
    log_loaded(name, len(dicts), f"images ({n_questions} questions)")
    return dicts


def register_muse(root: str | None = None) -> None:
    """Register ``muse_<split>`` for the released files under ``<root>/muse`` (images under ``<root>/coco``)."""
    root = datasets_root(root)
    directory, coco = os.path.join(root, "muse"), os.path.join(root, "coco")
    image_root = os.path.join(coco, "train2014")
    for split in MUSE_SPLITS:
        name = f"muse_{split}"
        register_lazy(
            name,
            lambda name=name, split=split: load_muse_json(muse_json_path(directory, split), image_root, name,
                                                          coco_root=coco),
            task=MUSE_TASK, evaluator_type="muse", split=split, json_file=os.path.join(directory, f"muse_{split}.json"),
            image_root=image_root, coco_root=coco,
        )
