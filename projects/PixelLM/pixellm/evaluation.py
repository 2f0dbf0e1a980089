"""PixelLM evaluation: the MUSE protocol and referring segmentation through psalm's evaluators.

MUSE (official ``ar_validate``): per question, the predicted masks (one per generated codebook
group) are Hungarian-matched to the GT masks with cost BCE + Dice (1:1) on 12544 uniform points
shared by all masks (psalm's :class:`~psalm.modeling.matcher.HungarianMatcher`); the smaller side
is padded with empty masks, so a question gives P = max(K, G) pairs. Per image IoU = sum of pair
IoUs / number of pairs (an empty-empty pair counts 1); gIoU = mean over images, cIoU = sum I /
sum U. The paper additionally gates IoUs with GPT-3.5 scores; that code was never released, so
these figures are **IoU without GPT scoring** (``without_gpt_scoring: 1.0`` in the results, and logged).

Referring (RefCOCO-style, psalm's :class:`~psalm.evaluation.referring.ReferringEvaluator`): each
sentence is a question ``"What is {sent} in this image? Please output segmentation mask."``;
protocol ``teacher_forced`` (official ``validate``: the answer ``[SEG0]..[SEG5].`` is given) or
``generate`` (what users get). ``MODEL.PIXELLM.EVAL.MULTI_REFER`` evaluates a referring data set
as MRefCOCO (the official multi-referring protocol: the sentences of an image asked together in
groups of 6 / 5 / 4, teacher-forced), still scored per sentence by psalm's evaluator.
gRefCOCO-style data sets (``evaluator_type: gres``) use psalm's ``GRESEvaluator`` with generated
answers: an answer without codebook groups is the "no target" prediction.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Instances

from psalm.evaluation.masks import intersection_union
from psalm.modeling.matcher import HungarianMatcher

__all__ = ["MuseEvaluator", "muse_pairs", "referring_inputs", "evaluate_pixellm", "run_model", "GPT_NOTE"]

logger = logging.getLogger(__name__)
# the evaluator_type values evaluate_pixellm handles (MUSE: psalm's loader's type, for every MUSE-format set)
EVALUATOR_TYPES = frozenset({"muse", "referring", "gres"})
GPT_NOTE = "IoU without the GPT-3.5 scoring of the paper (its code was never released)"


def muse_pairs(pred_logits: torch.Tensor, gt: torch.Tensor, matcher: HungarianMatcher) -> list[tuple[int, int]]:
    """(I, U) of every padded pair of one question. pred_logits [K, H, W], gt [G, H, W] bool."""
    pred_bin = (pred_logits > 0).cpu().numpy()
    gt_np = gt.cpu().numpy().astype(bool)
    k, g = pred_bin.shape[0], gt_np.shape[0]
    pairs = []
    if k and g:
        rows, cols = matcher(pred_logits[None].float(), [{"masks": gt.float()}])[0]
        rows, cols = rows.tolist(), cols.tolist()
    else:
        rows, cols = [], []
    for r, c in zip(rows, cols):
        pairs.append(intersection_union(pred_bin[r], gt_np[c]))
    for c in sorted(set(range(g)) - set(cols)):  # unmatched GT vs an empty prediction
        pairs.append(intersection_union(np.zeros_like(gt_np[c]), gt_np[c]))
    for r in sorted(set(range(k)) - set(rows)):  # unmatched prediction vs an empty GT
        pairs.append(intersection_union(pred_bin[r], np.zeros_like(pred_bin[r])))
    return pairs


class MuseEvaluator(DatasetEvaluator):
    """``process(inputs, outputs)``: mapped inputs (``gt_masks``, ``target_names``) and the model's
    per-image outputs (``answers``: one dict with ``mask_logits`` per question)."""

    def __init__(self, dataset_name: str = "", num_points: int = 12544, seed: int = 0):
        self.dataset_name = dataset_name
        self.matcher = HungarianMatcher(cost_class=0.0, cost_mask=1.0, cost_dice=1.0, num_points=num_points)
        self.seed = seed
        self.reset()

    def reset(self):
        self._images = []

    def process(self, inputs, outputs):
        gen = torch.Generator().manual_seed(self.seed + len(self._images))
        self.matcher.sample_points = lambda n, device: torch.rand(1, n, 2, generator=gen).to(device)
        for inp, out in zip(inputs, outputs):
            counts = [len(n) for n in inp["target_names"]]
            if len(out["answers"]) != len(counts):
                raise ValueError(f"{len(out['answers'])} answers for {len(counts)} questions")
            gts = torch.split(inp["gt_masks"], counts)
            pairs, n_pred = [], 0
            for ans, gt in zip(out["answers"], gts):
                pairs += muse_pairs(ans["mask_logits"], gt, self.matcher)
                n_pred += ans["mask_logits"].shape[0]
            ious = [i / u if u else 1.0 for i, u in pairs]
            self._images.append({"I": sum(i for i, _ in pairs), "U": sum(u for _, u in pairs),
                                 "iou": float(np.mean(ious)) if ious else 1.0, "num_pairs": len(pairs),
                                 "num_pred": n_pred, "num_gt": sum(counts)})

    def evaluate(self):
        if not self._images:
            raise RuntimeError(f"MuseEvaluator({self.dataset_name}): no image was processed")
        im = self._images
        logger.info("MUSE %s: %s", self.dataset_name, GPT_NOTE)
        return {"muse": {"gIoU": 100.0 * float(np.mean([x["iou"] for x in im])),
                         "cIoU": 100.0 * sum(x["I"] for x in im) / max(sum(x["U"] for x in im), 1),
                         "num_images": len(im), "num_pred": sum(x["num_pred"] for x in im),
                         "num_gt": sum(x["num_gt"] for x in im),
                         # numeric for detectron2's EvalHook; the sentence is logged by evaluate()
                         "without_gpt_scoring": 1.0}}


def referring_inputs(record: dict, mapper, protocol: str) -> list[dict]:
    """One model input per sentence of a psalm referring record (single target)."""
    from .data.prompt import REFER_QUESTION, build_conversation, tokenize_conversation, tokenizer_image_token
    from psalm.utils.image_io import read_image_rgb

    from .modeling.vision import preprocess_clip_image

    image = read_image_rgb(record["file_name"])
    clip, size = preprocess_clip_image(image, mapper.image_size, **mapper.norm)
    sents = record["sentences"]
    out = []
    for s in sents:
        s = s["raw"] if isinstance(s, dict) else str(s)
        q = REFER_QUESTION.format(sent=s)
        x = {"clip_image": clip, "clip_size": size, "height": image.shape[0], "width": image.shape[1],
             "file_name": record["file_name"], "image_id": record.get("image_id"), "sample_id": record.get("sample_id")}
        if protocol == "teacher_forced":
            ids, _ = tokenize_conversation(mapper.tokenizer, build_conversation(q, mapper.group + ".", eos_token=mapper.eos))
            x.update(input_ids=[ids], answers_given=True)
        elif protocol == "generate":
            x.update(input_ids=[tokenizer_image_token(build_conversation(q), mapper.tokenizer)])
        else:
            raise ValueError(f"referring protocol must be 'teacher_forced' or 'generate', got {protocol!r}")
        out.append(x)
    return out


MULTI_REFER_GROUPS = (6, 5, 4)


def multi_referring_conversations(sentences, group: str, eos_token: str = "</s>"):
    """MRefCOCO (official multi-referring evaluation): the sentences of one image grouped cyclically
    in groups of 6, 5, 4 into ``"What is a, b, ... and f in this image? Please output segmentation
    mask."``; teacher-forced answer ``"G, G, ... and G."`` (one codebook group G per sentence; a
    single-sentence group is answered ``"G"``, as the official code). Returns (question, answer,
    sentence indices) triples."""
    from .data.prompt import MULTI_REFER_QUESTION, join_phrases

    out, i, g = [], 0, 0
    while i < len(sentences):
        n = MULTI_REFER_GROUPS[g % len(MULTI_REFER_GROUPS)]
        idx = list(range(i, min(i + n, len(sentences))))
        texts = [sentences[k].strip() for k in idx]
        text = join_phrases(texts)
        ans = join_phrases([group] * len(idx)) + ("." if len(idx) > 1 else "")
        out.append((MULTI_REFER_QUESTION.format(sent=text), ans, idx))
        i += n
        g += 1
    return out


def multi_referring_inputs(records: list[dict], mapper) -> tuple[dict, list[dict]]:
    """One teacher-forced model input for all sentence records of ONE image; returns (input, the
    records in target order)."""
    from psalm.utils.image_io import read_image_rgb

    from .data.prompt import build_conversation, tokenize_conversation
    from .modeling.vision import preprocess_clip_image

    image = read_image_rgb(records[0]["file_name"])
    clip, size = preprocess_clip_image(image, mapper.image_size, **mapper.norm)
    sents = [r["sentences"][0]["raw"] if isinstance(r["sentences"][0], dict) else str(r["sentences"][0]) for r in records]
    ids, order = [], []
    for q, a, idx in multi_referring_conversations(sents, mapper.group, mapper.eos):
        ids.append(tokenize_conversation(mapper.tokenizer, build_conversation(q, a, eos_token=mapper.eos))[0])
        order += idx
    x = {"clip_image": clip, "clip_size": size, "height": image.shape[0], "width": image.shape[1],
         "input_ids": ids, "answers_given": True}
    return x, [records[k] for k in order]


@torch.no_grad()
def run_model(model, inputs: list[dict], protocol: str, max_new_tokens: int | None = None) -> list[dict]:
    """Per input: ``answers`` (one per question) with ``mask_logits`` [K, H, W] (and text ids)."""
    if protocol == "teacher_forced":
        out = model.forward_teacher_forced(inputs, strict=False)
        res = []
        for i, x in enumerate(inputs):
            counts = [f.shape[0] for f, img in zip(out["fused"], out["row_image"]) if img == i]
            res.append({"answers": [{"mask_logits": m} for m in torch.split(out["pred_masks"][i], counts)]})
        return res
    from .modeling.generation import generate

    gen_inputs = [dict(x, input_ids=x.get("prompt_ids", x["input_ids"])) for x in inputs]
    return generate(model, gen_inputs, max_new_tokens=max_new_tokens)


def evaluate_pixellm(cfg, model, dataset_names=None, limit: int = 0) -> dict:
    """Evaluate on every ``DATASETS.TEST`` entry, by its ``evaluator_type`` (:data:`EVALUATOR_TYPES`):
    ``muse`` (every MUSE-format set: psalm's ``muse_<split>``, ``pixellm_muse_<split>``, the synthetic
    ones) with :class:`MuseEvaluator`, ``referring`` with psalm's ``ReferringEvaluator`` (MRefCOCO with
    ``EVAL.MULTI_REFER``), ``gres`` with psalm's ``GRESEvaluator``. Any other type is a ValueError,
    raised before the first model run. Returns {data set name: results}."""
    from psalm.evaluation.referring import GRESEvaluator, ReferringEvaluator

    from .engine import build_mapper, prepare_pixellm_data_for_cfg
    from .modeling.tokenizer import load_pixellm_tokenizer

    prepare_pixellm_data_for_cfg(cfg)
    import psalm.data.datasets  # noqa: F401  (registers psalm's data sets)
    from psalm.data.datasets.synthetic import prepare_synthetic_for_cfg

    prepare_synthetic_for_cfg(cfg)
    p = cfg.MODEL.PIXELLM
    tokenizer = model.tokenizer or load_pixellm_tokenizer(p.TOKENIZER or p.MODEL_DIR)
    mapper = build_mapper(cfg, tokenizer, is_train=False)
    was_training = model.training
    model.eval()
    results = {}
    bs = max(1, int(cfg.TEST.PSALM.IMS_PER_BATCH)) if "PSALM" in cfg.TEST else 1
    kinds = {name: MetadataCatalog.get(name).get("evaluator_type", None)
             for name in dataset_names or cfg.DATASETS.TEST}
    for name, kind in kinds.items():  # fail before any model run, not after the first data sets
        if kind not in EVALUATOR_TYPES:
            raise ValueError(
                f"PixelLM cannot evaluate {name!r}: its evaluator_type is {kind!r}; PixelLM evaluates "
                f"{sorted(EVALUATOR_TYPES)} data sets (MUSE-format: psalm's muse_<split>, pixellm_muse_<split>, "
                "pixellm_synthetic_muse_<split>; RefCOCO-style referring; gRefCOCO-style gres)")
    for name, kind in kinds.items():
        records = DatasetCatalog.get(name)
        if limit:
            records = records[:limit]
        if kind == "muse":
            ev = MuseEvaluator(name)
            inputs = [x for x in (mapper(r) for r in records) if x is not None]
            for i in tqdm(range(0, len(inputs), bs), desc=f"PixelLM {name}", disable=len(inputs) < 10):
                batch = inputs[i : i + bs]
                ev.process(batch, run_model(model, batch, p.EVAL.MUSE_PROTOCOL))
        elif p.EVAL.MULTI_REFER and kind == "referring":
            ev = ReferringEvaluator(name, distributed=False)
            ev.reset()
            by_image: dict = {}
            for r in records:
                by_image.setdefault(r["file_name"], []).append(r)
            for recs in tqdm(by_image.values(), desc=f"PixelLM multi-referring {name}", disable=len(by_image) < 10):
                x, ordered = multi_referring_inputs(recs, mapper)
                masks = model.forward_teacher_forced([x], strict=False)["pred_masks"][0] > 0
                if masks.shape[0] != len(ordered):  # malformed groups: every target gets an empty mask
                    masks = masks.new_zeros(len(ordered), x["height"], x["width"])
                for r, m in zip(ordered, masks):
                    inst = Instances((x["height"], x["width"]))
                    inst.pred_masks = m[None]
                    ev.process([r], [{"instances": inst}])
        else:
            gres = kind == "gres"
            if p.EVAL.MULTI_REFER:
                logger.info("%s is generalized referring: MODEL.PIXELLM.EVAL.MULTI_REFER applies to referring "
                            "data sets only", name)
            protocol = p.EVAL.REFER_PROTOCOL
            if gres and protocol == "teacher_forced":
                # a given answer always has one group: "no target" could never be predicted
                logger.info("%s is generalized referring: evaluated with the generated-answer protocol", name)
                protocol = "generate"
            ev = (GRESEvaluator if gres else ReferringEvaluator)(name, distributed=False)
            ev.reset()
            for r in tqdm(records, desc=f"PixelLM {name}", disable=len(records) < 10):
                for x in referring_inputs(r, mapper, protocol):
                    out = run_model(model, [x], protocol)[0]["answers"][0]
                    m = out["mask_logits"] > 0
                    inst = Instances((x["height"], x["width"]))
                    # the prediction of a sentence is the union of the answer's masks; an answer
                    # without codebook groups is "no target" (gRefCOCO) / an empty mask
                    inst.pred_masks = m.any(0, keepdim=True) if len(m) else m.new_zeros(1, x["height"], x["width"])
                    ev.process([r], [{"instances": inst, "no_target": len(m) == 0}])
        results[name] = ev.evaluate()
        logger.info("%s: %s", name, results[name])
    model.train(was_training)
    return results
