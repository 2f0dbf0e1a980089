"""Pixel-SAIL evaluation: psalm's referring / gRefCOCO evaluators for masks, plus the visual-prompt and
PerBench metrics (spec B2.4, B3, B7.6).

* ``VPCategoryEvaluator`` (``interactive`` data sets): accuracy of the class named in each region's
  answer (:func:`pixel_sail.data.parse_category`) against the region's GT category; a region whose answer
  names no class counts as wrong.
* ``meteor(references, hypothesis)``: nltk's METEOR with the arguments in the right order (the official
  script passes the prediction as the reference, B7.6); needs ``nltk`` with WordNet (optional
  dependency, a clear error without it).
* ``parse_option(text, options)``: the chosen option letter of a multiple-choice answer ("B", "(B)",
  "B.", "The answer is B", "Answer: b") -- the first standalone letter among the options; None when the
  answer names none (counted wrong), unlike the official substring test that accepts e.g. any "A" in the text.
* ``vres_metrics``: V-T RES cIoU / gIoU over EVERY sample and EVERY GT mask: a sample without a
  prediction scores I = 0 (its GT area still enters U), and each GT tag is compared with the prediction
  of the same order (missing predictions are empty masks).
* PerBench loaders for the official JSON layouts (``STBench_Detailed_Caption.json``, ``STBench_MCQ.json``,
  ``STBench_VRES.json``; the files are not public).
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Optional, Sequence

import numpy as np

from psalm.data.visual_prompts import decode_rle
from psalm.evaluation.base import SampleGTEvaluator

from .data import parse_category

__all__ = ["VPCategoryEvaluator", "meteor", "corpus_meteor", "parse_option", "mcq_accuracy", "vres_metrics",
           "load_perbench_caption", "load_perbench_mcq", "load_perbench_vres", "PERBENCH_PROMPTS", "run_perbench"]

PERBENCH_PROMPTS = {
    "caption": "<image>\nCan you provide me with a detailed description of the region in the picture marked by "
               "<Prompt0>? Please provide as detailed as possible.",
    "mcq": "<image>\nPlease answer the question according to the <Prompt0>. {question}Select a correct choice.",
    "region_caption": "<image>\nCan you provide me with a detailed description of the region in the picture marked "
                      "by <Prompt0>?",
}


class VPCategoryEvaluator(SampleGTEvaluator):
    task_key = "vp_category"

    def _process_one(self, record, inp, out):
        names = list(self.metadata.thing_classes)
        idx = inp.get("region_ann_indices", list(range(len(record["annotations"]))))
        texts = out.get("region_texts")
        if texts is None or len(texts) != len(idx):
            raise ValueError(f"sample {inp.get('sample_id')}: expected {len(idx)} region answers, got "
                             f"{None if texts is None else len(texts)}")
        gt = [names[record["annotations"][j]["category_id"]] for j in idx]
        pred = [parse_category(t, names) for t in texts]
        return {"correct": sum(p == g for p, g in zip(pred, gt)), "total": len(gt),
                "unparsed": sum(p is None for p in pred)}

    def _summarize(self, stats):
        vals = list(stats.values())
        total = sum(v["total"] for v in vals)
        return {"accuracy": 100.0 * sum(v["correct"] for v in vals) / max(total, 1), "num_regions": total,
                "unparsed": sum(v["unparsed"] for v in vals), "num_samples": len(vals)}


# ----------------------------------------------------------------------------------- METEOR
def _nltk_meteor():
    try:
        from nltk.translate.meteor_score import meteor_score
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("METEOR needs nltk with the WordNet corpus: pip install nltk; "
                          "python -m nltk.downloader wordnet") from e
    return meteor_score


def meteor(references: Sequence[str], hypothesis: str) -> float:
    """METEOR of one hypothesis against its references: ``meteor_score(references, hypothesis)`` (nltk's
    order: references first), whitespace-tokenised, lower-cased."""
    score = _nltk_meteor()
    return float(score([r.lower().split() for r in references], hypothesis.lower().split()))


def corpus_meteor(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> float:
    """Mean sentence METEOR x 100."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    return 100.0 * float(np.mean([meteor(r, h) for r, h in zip(references, hypotheses)])) if hypotheses else float("nan")


# ----------------------------------------------------------------------------------- MCQ
def parse_option(text: str, options: str = "ABCD") -> Optional[str]:
    """The first standalone option letter in ``text`` (module docstring)."""
    opts = "".join(sorted(set(options.upper())))
    m = re.search(r"(?:answer|choice|option)\s*(?:is|:)?\s*\(?([%s])\b" % opts, text, flags=re.I)
    if m:
        return m.group(1).upper()
    m = re.search(r"\(([%s])\)" % opts, text)  # "(B)"
    if m:
        return m.group(1)
    # a capital letter standing alone and followed by ".", ")", ":", "," or the end ("B.", "C)"); a bare
    # "A" inside a sentence is the article, not an option
    m = re.search(r"(?<![A-Za-z])([%s])(?=[.):,]|\s*$)" % opts, text.strip())
    return m.group(1).upper() if m else None


def mcq_accuracy(predictions: Sequence[str], answers: Sequence[str], options: str = "ABCD") -> Dict:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    parsed = [parse_option(p, options) for p in predictions]
    gts = [parse_option(a, options) or a.strip().upper() for a in answers]
    correct = sum(p is not None and p == g for p, g in zip(parsed, gts))
    return {"accuracy": 100.0 * correct / max(len(answers), 1), "unparsed": sum(p is None for p in parsed),
            "num_questions": len(answers)}


# ----------------------------------------------------------------------------------- V-T RES
def vres_metrics(predictions: Sequence[Optional[Sequence[np.ndarray]]], ground_truths: Sequence[Sequence[np.ndarray]]) -> Dict:
    """cIoU / gIoU (percent) over every sample and every GT mask (module docstring).

    predictions[i]: list of bool [H, W] masks in answer order, or None / [] when nothing was predicted;
    ground_truths[i]: list of bool [H, W] masks (the answer's tags, in order).
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truths)} samples")
    inter_sum = union_sum = 0
    ious = []
    for pred, gts in zip(predictions, ground_truths):
        pred = list(pred or [])
        for j, g in enumerate(gts):
            g = np.asarray(g, dtype=bool)
            p = np.asarray(pred[j], dtype=bool) if j < len(pred) else np.zeros_like(g)
            i, u = int((p & g).sum()), int((p | g).sum())
            inter_sum, union_sum = inter_sum + i, union_sum + u
            ious.append(1.0 if u == 0 else i / u)
    return {"cIoU": 100.0 * inter_sum / max(union_sum, 1), "gIoU": 100.0 * float(np.mean(ious)) if ious else float("nan"),
            "num_masks": len(ious), "num_samples": len(ground_truths)}


# ----------------------------------------------------------------------------------- PerBench loaders
def _load(path):
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of images")
    return data


def _need(entry, keys, path):
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{path}: entry {entry.get('image_name', '?')!r} lacks {missing}")


def load_perbench_caption(path: str) -> List[Dict]:
    """[{image_name, object_annotations: [{segmentation: RLE, caption}]}] -> one sample per object:
    {image_name, prompt_mask bool [H, W], caption, question}."""
    out = []
    for e in _load(path):
        _need(e, ("image_name", "object_annotations"), path)
        for k, obj in enumerate(e["object_annotations"]):
            _need(obj, ("segmentation", "caption"), path)
            out.append(dict(image_name=e["image_name"], index=k, prompt_mask=decode_rle(obj["segmentation"]).astype(bool),
                            caption=obj["caption"], question=PERBENCH_PROMPTS["caption"]))
    return out


def load_perbench_mcq(path: str) -> List[Dict]:
    """[{image_name, mcqs: [{object: RLE, question, answer}]}] -> one sample per question."""
    out = []
    for e in _load(path):
        _need(e, ("image_name", "mcqs"), path)
        for k, q in enumerate(e["mcqs"]):
            _need(q, ("object", "question", "answer"), path)
            out.append(dict(image_name=e["image_name"], index=k, prompt_mask=decode_rle(q["object"]).astype(bool),
                            answer=q["answer"], question=PERBENCH_PROMPTS["mcq"].format(question=q["question"])))
    return out


def load_perbench_vres(path: str) -> List[Dict]:
    """[{image_name, question, answer, segmentations: {tag: RLE}}] -> samples with the question's tags
    replaced by <Prompt0..> (prompt masks, in order of appearance) and the answer's tags as GT masks."""
    from .tokens import prompt_token

    out = []
    for e in _load(path):
        _need(e, ("image_name", "question", "answer", "segmentations"), path)
        segs = e["segmentations"]
        q_tags = sorted([t for t in segs if t in e["question"]], key=lambda t: e["question"].index(t))
        a_tags = sorted([t for t in segs if t in e["answer"] and t not in q_tags], key=lambda t: e["answer"].index(t))
        question = e["question"]
        for k, t in enumerate(q_tags):
            question = question.replace(t, prompt_token(k))
        if not a_tags:
            raise ValueError(f"{path}: {e['image_name']!r}: no answer tag has a segmentation")
        out.append(dict(image_name=e["image_name"], question=question,
                        prompt_masks=[decode_rle(segs[t]).astype(bool) for t in q_tags],
                        gt_masks=[decode_rle(segs[t]).astype(bool) for t in a_tags], answer=e["answer"]))
    return out


# ----------------------------------------------------------------------------------- PerBench runner
def run_perbench(predictor, image_root: str, caption_json: Optional[str] = None, mcq_json: Optional[str] = None,
                 vres_json: Optional[str] = None, options: str = "ABCD") -> Dict:
    """Run the PerBench tasks through a :class:`pixel_sail.predictor.PixelSAILPredictor` (one call per
    sample; prompt masks as ``masks=``): detailed caption -> METEOR, VP-MCQ -> accuracy, V-T RES -> cIoU /
    gIoU (task ``vt_res``: the forced "It is [SEG]." retry of the official evaluator). ``overall`` is the
    mean of METEOR, MCQ accuracy and V-T RES cIoU; the paper's overall does not follow from its three quoted
    numbers (spec B2.4), so compare the three task scores, not ``overall``."""
    import os

    from tqdm import tqdm

    def image(name):
        path = os.path.join(image_root, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PerBench image {path} not found (image_root {image_root})")
        return path

    res = {}
    if caption_json:
        samples = load_perbench_caption(caption_json)
        hyps = [predictor(image(s["image_name"]), question=s["question"], masks=[s["prompt_mask"]], task="chat")["text"]
                for s in tqdm(samples, desc="PerBench caption")]
        res["caption"] = {"METEOR": corpus_meteor([[s["caption"]] for s in samples], hyps), "num_samples": len(samples)}
    if mcq_json:
        samples = load_perbench_mcq(mcq_json)
        preds = [predictor(image(s["image_name"]), question=s["question"], masks=[s["prompt_mask"]], task="chat")["text"]
                 for s in tqdm(samples, desc="PerBench MCQ")]
        res["mcq"] = mcq_accuracy(preds, [s["answer"] for s in samples], options)
    if vres_json:
        samples = load_perbench_vres(vres_json)
        preds = []
        for s in tqdm(samples, desc="PerBench V-T RES"):
            out = predictor(image(s["image_name"]), question=s["question"], masks=s["prompt_masks"] or None, task="vt_res")
            preds.append(list(out["masks"]))
        res["vt_res"] = vres_metrics(preds, [s["gt_masks"] for s in samples])
    if {"caption", "mcq", "vt_res"} <= set(res):
        res["overall"] = float(np.mean([res["caption"]["METEOR"], res["mcq"]["accuracy"], res["vt_res"]["cIoU"]]))
    return res
