"""MUSE (multi-target reasoning segmentation) data for PixelLM: the synthetic MUSE-format data
generated from psalm's scenes, and the multi-target conversions of referring and semantic data
(official ``refer_seg`` / ``sem_seg`` members of the mixture).

The released format and its loader are psalm's (:mod:`psalm.data.datasets.muse`, re-exported here:
:func:`load_muse_json`, :func:`muse_records_to_dicts`, :func:`target_name`); its dataset dicts are what
:class:`pixellm.data.mapper.PixelLMDatasetMapper` reads: ``file_name``, ``height``, ``width``,
``image_id``, ``questions`` (list[str]), ``targets`` (per question, a list of annotation dicts with
``segmentation`` (or ``mask``, bool [H, W]) and ``name``), ``text_answers`` (per question, str or None)
and optionally ``question_template`` (the mapper's prompt around a question).

Multi-target conversion (official ``refer_seg`` / ``sem_seg`` data, spec A2.2), one implementation
for referring and semantic data: the candidate targets of an image (referred objects / classes
present in the label map) are allocated to questions by :func:`allocate_targets` (official
``allocate_class``: at most 3 x 3 candidates, min(3, n) questions of 1..3 targets), and each question
and its answer are written by :func:`short_question_answer` with the official short templates
(question ``"<image>\\nCan you segment the a, b and c in this image?"`` ...; answer ``"It is {seg}."``
... for one target, ``"a is {seg}, b is {seg} and c is {seg}."`` ... or ``"a, b and c are {seg},
{seg} and {seg}, separately."`` ... for several). The answers are ``text_answers`` with one
``{seg}`` per target in target order; the mapper puts one codebook group in each.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib

import numpy as np

from psalm.data.datasets.muse import load_muse_json, muse_records_to_dicts, target_name
from psalm.data.mapper import read_label_map
from psalm.data.visual_prompts import encode_rle

from .prompt import IMAGE_TOKEN, join_phrases

__all__ = ["load_muse_json", "muse_records_to_dicts", "prepare_synthetic_muse", "multi_target_from_referring",
           "multi_target_from_semantic", "allocate_targets", "short_question_answer", "class_phrase", "target_name",
           "SHORT_QUESTION_TEMPLATE"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- synthetic
ANSWER_STYLES = {"is": "{phrase} is {{seg}}", "phrase": "{phrase} {{seg}}"}


def prepare_synthetic_muse(root, split: str, spec=None, questions_per_image: int = 2, max_targets: int = 3,
                           seed: int = 0, answer_style: str = "is") -> str:
    """Write ``<root>/<split>/*.png`` and ``<root>/muse_<split>.json`` in the released MUSE format.

    Scenes are psalm's synthetic scenes (:func:`psalm.data.synthetic.generate_scene`); each question
    names 1..``max_targets`` objects by uniquely identifying expressions
    (:mod:`psalm.data.synthetic_language`), and ``text_answers`` place one ``{seg}`` after each
    target phrase. ``answer_style``: "is" ("the red circle is {seg}", the documented runs) or "phrase"
    ("the red circle {seg}": the placeholder right after the phrase, as the released MUSE answers
    place it). Deterministic for a given (spec, split, seed, answer_style).
    """
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"answer_style must be one of {sorted(ANSWER_STYLES)}, got {answer_style!r}")
    from PIL import Image

    from psalm.data import synthetic as syn
    from psalm.data import synthetic_language as lang

    spec = spec or syn.SyntheticSpec()
    root = pathlib.Path(root)
    out_json = root / f"muse_{split}.json"
    # the files depend on the scene spec and the question parameters: a directory written with other
    # ones is an error, never silently reused
    params = {"spec": spec.to_json(), "questions_per_image": questions_per_image, "max_targets": max_targets,
              "seed": seed, "split": split, "answer_style": answer_style}
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
            questions.append(f"Can you segment {join_phrases(phrases)} in this image?")
            answers.append([anns[t] for t in chosen])
            text_answers.append(join_phrases([ANSWER_STYLES[answer_style].format(phrase=p) for p in phrases]) + ".")
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
# Official templates of the refer_seg / sem_seg data (utils/utils.py SHORT_QUESTION_LIST, ANSWER_LIST,
# SINGLE_ANSWER_LIST, MULTI_ANSWER_LIST); "{c}" = the target phrase(s), "{seg}" = one target's
# codebook group. The questions hold "<image>\n" themselves (SHORT_QUESTION_TEMPLATE).
SHORT_QUESTION_TEMPLATE = IMAGE_TOKEN + "\n{sent}"
SHORT_QUESTIONS = ("Can you segment the {c} in this image?", "Please segment the {c} in this image.",
                   "What is {c} in this image? Please respond with segmentation mask.",
                   "What is {c} in this image? Please output segmentation mask.")
ANSWERS_ONE = ("It is {seg}.", "Sure, {seg}.", "Sure, it is {seg}.", "Sure, the segmentation result is {seg}.",
               "{seg}.")
ANSWERS_EACH = ("{c} is {seg}.", "The segmentation result of {c} is {seg}.", "{seg}.")
ANSWERS_ALL = ("{c} are {seg}, separately.", "{c} are {seg}.", "Sure, {c} are {seg}, separately.",
               "Sure, {c} are {seg}.", "the segmentation result of {c} are {seg}.",
               "the segmentation result of {c} are {seg}, separately.", "Sure, the segmentation result of {c} are {seg}.",
               "Sure, the segmentation result of {c} are {seg}, separately.", "Sure, they are {seg}.",
               "They are {seg}.", "{seg}.")


def _pick(templates, rng: np.random.Generator) -> str:
    return templates[int(rng.integers(len(templates)))]


def short_question_answer(phrases, rng: np.random.Generator) -> tuple[str, str]:
    """(question, text answer) of one multi-target question (official refer_seg / sem_seg sample).

    The question is a random short template with the phrases joined (``"a, b and c"``, lower-cased
    as the official code); the answer, with one ``{seg}`` per target in ``phrases`` order, is a random
    single-target answer for one phrase, else (probability 1/2 each) one per-target template
    joined over the targets (``"a is {seg}, b is {seg} and c is {seg}."``) or one template for all
    (``"a, b and c are {seg}, {seg} and {seg}, separately."``). Deterministic given ``rng``.
    """
    phrases = [str(x) for x in phrases]
    listed = join_phrases(phrases).lower()
    question = _pick(SHORT_QUESTIONS, rng).replace("{c}", listed)
    separate = int(rng.integers(2))
    if len(phrases) == 1:
        return question, _pick(ANSWERS_ONE, rng)
    if separate:
        tpl = _pick(ANSWERS_EACH, rng)
        return question, join_phrases([tpl.replace("{c}", p)[:-1] for p in phrases]) + "."
    segs = join_phrases(["{seg}"] * len(phrases))
    return question, _pick(ANSWERS_ALL, rng).replace("{c}", listed).replace("{seg}", segs)


def allocate_targets(num_targets: int, rng: np.random.Generator, questions_per_image: int = 3,
                     targets_per_question: int = 3) -> list[list[int]]:
    """Random allocation of ``num_targets`` candidates to questions (official ``allocate_class``).

    At most ``questions_per_image * targets_per_question`` candidates are drawn (without
    replacement, random order); there are ``min(questions_per_image, drawn)`` questions, and each
    drawn candidate goes, in turn, to a random question among those still without a target, else
    among those with fewer than ``targets_per_question``. So every drawn candidate is used once and
    every question has 1..``targets_per_question`` targets. Returns the candidate indices per
    question in answer order; deterministic given ``rng``.
    """
    drawn = rng.permutation(int(num_targets))[: questions_per_image * targets_per_question].tolist()
    groups: list[list[int]] = [[] for _ in range(min(questions_per_image, len(drawn)))]
    for j in drawn:
        counts = np.array([len(g) for g in groups])
        free = np.flatnonzero(counts == 0) if (counts == 0).any() else np.flatnonzero(counts < targets_per_question)
        groups[int(free[int(rng.integers(len(free)))])].append(j)
    return groups


def _multi_target_dict(file_name: str, height: int, width: int, image_id, groups: list[list[dict]],
                       rng: np.random.Generator) -> dict | None:
    """A multi-target dict of one image from its targets per question (``name`` each), with the
    official short questions / answers (:func:`short_question_answer`)."""
    qs, ts, tas = [], [], []
    for targets in groups:
        if not targets:
            continue
        q, a = short_question_answer([t["name"] for t in targets], rng)
        qs.append(q), ts.append(targets), tas.append(a)
    if not qs:
        return None
    return {"file_name": file_name, "height": int(height), "width": int(width), "image_id": image_id,
            "questions": qs, "targets": ts, "text_answers": tas, "question_template": SHORT_QUESTION_TEMPLATE}


def multi_target_from_referring(dataset_dicts: list[dict], rng: np.random.Generator, questions_per_image: int = 3,
                                targets_per_question: int = 3) -> list[dict]:
    """Referring dicts (one per referred object: ``file_name``, ``height``, ``width``, ``sentences``,
    ``annotations`` with ``segmentation``) -> multi-target dicts (see :func:`_multi_target_dict`): per
    image up to ``questions_per_image`` questions with up to ``targets_per_question`` targets each,
    the referred objects randomly allocated (:func:`allocate_targets`); a random sentence names each
    target. Multi-object expressions are not single targets and are left out."""
    by_image: dict = {}
    for d in dataset_dicts:
        by_image.setdefault(d["file_name"], []).append(d)
    out = []
    for file_name, refs in by_image.items():
        groups = []
        for g in allocate_targets(len(refs), rng, questions_per_image, targets_per_question):
            targets = []
            for j in g:
                ref = refs[j]
                sent = ref["sentences"][int(rng.integers(len(ref["sentences"])))]
                sent = sent["raw"] if isinstance(sent, dict) else str(sent)
                anns = ref["annotations"]
                if len(anns) != 1:
                    continue  # multi-object expressions are not single targets
                targets.append(dict(anns[0], name=sent))
            groups.append(targets)
        r0 = refs[0]
        d = _multi_target_dict(file_name, r0["height"], r0["width"], r0.get("image_id"), groups, rng)
        if d is not None:
            out.append(d)
    return out


def class_phrase(class_name: str) -> str:
    """The phrase of a semantic class: the first of its comma-separated synonyms (psalm's prompt
    strings list synonyms, e.g. ADE20K ``"wall,walls,brick wall"`` -> ``"wall"``, the official name)."""
    phrase = str(class_name).split(",")[0].strip()
    if not phrase:
        raise ValueError(f"empty class name {class_name!r}")
    return phrase


def multi_target_from_semantic(d: dict, rng: np.random.Generator, questions_per_image: int = 3,
                               targets_per_question: int = 3) -> dict | None:
    """A semantic dict -> a multi-target dict whose targets are classes present in the label map.

    Args:
        d: ``file_name``, ``sem_seg_file_name`` (label map [H, W]: values index ``stuff_classes``, or
            ``ignore_label``), ``stuff_classes`` (list[str], the data set's metadata) and optionally
            ``ignore_label`` (default 255) and ``image_id``; :func:`pixellm.data.datasets.training_items`
            attaches the metadata to each dict of a semantic data set.
        rng: the draw's generator (allocation as :func:`allocate_targets`; deterministic given it).

    Returns:
        ``file_name``, ``height`` H, ``width`` W (of the label map), ``image_id``, ``questions``
        (<= ``questions_per_image``), ``targets`` (per question <= ``targets_per_question`` dicts
        ``name`` = :func:`class_phrase`, ``category_id`` = label value, ``mask`` = bool [H, W] of its
        pixels, in answer order), ``text_answers`` (one ``{seg}`` per target) and ``question_template``
        (:func:`short_question_answer`); None when the label map holds no class (all ignore).
    """
    where = d.get("file_name", "?")
    if not d.get("sem_seg_file_name"):
        raise ValueError(f"semantic dict of {where!r} has no 'sem_seg_file_name' (the label-map PNG); "
                         f"keys: {sorted(d)}")
    classes = d.get("stuff_classes")
    if not classes:
        raise ValueError(f"semantic dict of {where!r} has no 'stuff_classes': the data set's metadata must give the "
                         "class names (MetadataCatalog stuff_classes; training_items attaches them)")
    ignore = int(d.get("ignore_label", 255))
    label = read_label_map(d["sem_seg_file_name"])
    present = [int(c) for c in np.unique(label) if c != ignore]
    bad = [c for c in present if not 0 <= c < len(classes)]
    if bad:
        raise ValueError(f"{d['sem_seg_file_name']!r}: label values {bad} are neither class indices "
                         f"(0..{len(classes) - 1}) nor the ignore label {ignore}")
    if not present:
        logger.debug("semantic dict of %r: no class in %s (all ignore)", where, d["sem_seg_file_name"])
        return None
    groups = [[{"name": class_phrase(classes[present[j]]), "category_id": present[j], "mask": label == present[j]}
               for j in g] for g in allocate_targets(len(present), rng, questions_per_image, targets_per_question)]
    return _multi_target_dict(d["file_name"], label.shape[0], label.shape[1], d.get("image_id"), groups, rng)
