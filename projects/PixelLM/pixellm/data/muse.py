"""MUSE (multi-target reasoning segmentation) data: the released JSON format, its loader, the
synthetic MUSE-format data generated from psalm's scenes, and the multi-target conversion of
referring data.

Released format (spec A2.5): a JSON list, one dict per image: ``file_name`` (or ``coco_url``),
``height``, ``width``, ``ann_list`` (LVIS-style annotations: ``segmentation`` polygons or RLE,
``bbox``, ``category_name``, optional ``rephrased_name``), ``questions`` (list[str]), ``answers``
(one list of annotation dicts per question: that question's targets in answer order), optional
``text_answers`` (one string per question with a ``{seg}`` after each target phrase).

Dataset dicts (what :class:`pixellm.data.mapper.PixelLMDatasetMapper` reads): ``file_name``,
``height``, ``width``, ``image_id``, ``questions`` (list[str]), ``targets`` (per question, a list of
annotation dicts with ``segmentation`` and ``name``), ``text_answers`` (per question, str or None).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib

import numpy as np

from psalm.data.visual_prompts import encode_rle

__all__ = ["load_muse_json", "muse_records_to_dicts", "prepare_synthetic_muse", "multi_target_from_referring",
           "target_name"]

logger = logging.getLogger(__name__)


def target_name(ann: dict) -> str:
    """The phrase of a target: ``rephrased_name`` when present, else ``category_name`` / ``name``."""
    for key in ("rephrased_name", "name", "category_name"):
        if ann.get(key):
            return str(ann[key])
    raise ValueError(f"annotation has no rephrased_name / name / category_name: {sorted(ann)}")


def _image_path(rec: dict, image_root: str) -> str:
    if rec.get("file_name"):
        return os.path.join(image_root, rec["file_name"])
    url = rec.get("coco_url")
    if not url:
        raise ValueError("a MUSE record needs 'file_name' or 'coco_url'")
    split = "train2017" if "train2017" in url else "val2017"
    return os.path.join(image_root, split, url.rsplit("/", 1)[-1])


def muse_records_to_dicts(records: list, image_root: str) -> tuple[list[dict], dict]:
    """Released records -> dataset dicts. Returns (dicts, counts of dropped questions by reason)."""
    out, dropped = [], {"seg_count_mismatch": 0, "no_target": 0}
    for i, rec in enumerate(records):
        for key in ("height", "width", "questions", "answers"):
            if key not in rec:
                raise ValueError(f"MUSE record {i} has no {key!r} (keys: {sorted(rec)})")
        if len(rec["answers"]) != len(rec["questions"]):
            raise ValueError(f"MUSE record {i}: {len(rec['questions'])} questions but {len(rec['answers'])} answers")
        text_answers = rec.get("text_answers") or [None] * len(rec["questions"])
        qs, ts, tas = [], [], []
        for q, targets, ta in zip(rec["questions"], rec["answers"], text_answers):
            if not targets:
                dropped["no_target"] += 1
                continue
            if ta is not None and ta.count("{seg}") != len(targets):
                dropped["seg_count_mismatch"] += 1  # official: the sample is skipped
                continue
            qs.append(q)
            ts.append([dict(a, name=target_name(a)) for a in targets])
            tas.append(ta)
        if qs:
            out.append({"file_name": _image_path(rec, image_root), "height": int(rec["height"]),
                        "width": int(rec["width"]), "image_id": rec.get("id", i), "questions": qs, "targets": ts,
                        "text_answers": tas})
    return out, dropped


def load_muse_json(json_file, image_root) -> list[dict]:
    records = json.loads(pathlib.Path(json_file).read_text())
    dicts, dropped = muse_records_to_dicts(records, str(image_root))
    logger.info("MUSE %s: %d images, %d questions; dropped questions: %s", json_file, len(dicts),
                sum(len(d["questions"]) for d in dicts), dropped)
    return dicts


# ---------------------------------------------------------------------------------- synthetic
def prepare_synthetic_muse(root, split: str, spec=None, questions_per_image: int = 2, max_targets: int = 3,
                           seed: int = 0) -> str:
    """Write ``<root>/<split>/*.png`` and ``<root>/muse_<split>.json`` in the released MUSE format.

    Scenes are psalm's synthetic scenes (:func:`psalm.data.synthetic.generate_scene`); each question
    names 1..``max_targets`` objects by uniquely identifying expressions
    (:mod:`psalm.data.synthetic_language`), and ``text_answers`` place one ``{seg}`` after each
    target phrase. Deterministic for a given (spec, split, seed).
    """
    from PIL import Image

    from psalm.data import synthetic as syn
    from psalm.data import synthetic_language as lang

    spec = spec or syn.SyntheticSpec()
    root = pathlib.Path(root)
    out_json = root / f"muse_{split}.json"
    # the files depend on the scene spec and the question parameters: a directory written with other
    # ones is an error, never silently reused
    params = {"spec": spec.to_json(), "questions_per_image": questions_per_image, "max_targets": max_targets,
              "seed": seed, "split": split}
    manifest = root / f"muse_{split}.params.json"
    if out_json.is_file():
        if not manifest.is_file() or json.loads(manifest.read_text()) != params:
            raise ValueError(f"{out_json} was generated with other parameters than {params} (see {manifest}); "
                             "use another DATASETS.SYNTHETIC.ROOT / PIXELLM_SYNTHETIC_DIR or delete the directory")
        return str(out_json)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "test": 2}[split]])
    records = []
    for index in range(spec.num_images(split)):
        image, objects, _ = syn.generate_scene(spec, split, index)
        names = {}
        for t in range(len(objects)):
            exprs = lang.minimal_expressions(objects, t, spec.image_size)
            if exprs:
                names[t] = lang.render(exprs[int(rng.integers(len(exprs)))])
        if not names:
            continue
        file_name = f"{split}/{index:06d}.png"
        Image.fromarray(image).save(root / file_name)
        anns = []
        for t, obj in enumerate(objects):
            x0, y0, x1, y1 = obj["bbox"]
            anns.append({"id": t, "category_name": obj["shape"], "rephrased_name": names.get(t, ""),
                         "segmentation": encode_rle(obj["mask"]), "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})
        questions, answers, text_answers = [], [], []
        pool = sorted(names)
        for _ in range(questions_per_image):
            k = int(rng.integers(1, min(max_targets, len(pool)) + 1))
            chosen = [pool[i] for i in rng.permutation(len(pool))[:k].tolist()]
            phrases = [names[t] for t in chosen]
            listed = phrases[0] if k == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
            questions.append(f"Can you segment {listed} in this image?")
            answers.append([anns[t] for t in chosen])
            parts = [f"{p} is {{seg}}" for p in phrases]
            text_answers.append((parts[0] if k == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + ".")
        records.append({"id": index, "file_name": file_name, "height": int(image.shape[0]),
                        "width": int(image.shape[1]), "ann_list": anns, "questions": questions,
                        "answers": answers, "text_answers": text_answers})
    tmp = out_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    manifest.write_text(json.dumps(params))
    os.replace(tmp, out_json)
    logger.info("synthetic MUSE %s: %d images -> %s", split, len(records), out_json)
    return str(out_json)


# ---------------------------------------------------------------------------------- conversion
def multi_target_from_referring(dataset_dicts: list[dict], rng: np.random.Generator, questions_per_image: int = 3,
                                targets_per_question: int = 3) -> list[dict]:
    """Referring dicts (one per referred object: ``file_name``, ``height``, ``width``, ``sentences``,
    ``annotations`` with ``segmentation``) -> multi-target dicts: per image up to
    ``questions_per_image`` questions with up to ``targets_per_question`` targets each, the targets
    randomly allocated (official ``allocate_class``); a random sentence names each target."""
    by_image: dict = {}
    for d in dataset_dicts:
        by_image.setdefault(d["file_name"], []).append(d)
    out = []
    for file_name, refs in by_image.items():
        order = rng.permutation(len(refs)).tolist()[: questions_per_image * targets_per_question]
        groups, i = [], 0
        while i < len(order) and len(groups) < questions_per_image:
            k = int(rng.integers(1, targets_per_question + 1))
            groups.append(order[i : i + k])
            i += k
        qs, ts = [], []
        for g in groups:
            targets = []
            for j in g:
                ref = refs[j]
                sent = ref["sentences"][int(rng.integers(len(ref["sentences"])))]
                sent = sent["raw"] if isinstance(sent, dict) else str(sent)
                anns = ref["annotations"]
                if len(anns) != 1:
                    continue  # multi-object expressions are not single targets
                targets.append(dict(anns[0], name=sent))
            if not targets:
                continue
            phrases = [t["name"] for t in targets]
            listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
            qs.append(f"Can you segment the {listed} in this image?")
            ts.append(targets)
        if qs:
            r0 = refs[0]
            out.append({"file_name": file_name, "height": r0["height"], "width": r0["width"],
                        "image_id": r0.get("image_id"), "questions": qs, "targets": ts, "text_answers": [None] * len(qs)})
    return out
