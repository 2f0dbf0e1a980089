#!/usr/bin/env python
"""Side-by-side inference benchmark: psalm against the OFFICIAL PSALM code (zamling/PSALM ``d5dbfda``).

Both models are built from ONE random state dict, run on the same synthetic images, and compared.
The official code is never copied into this repository: it stays in an extracted tree outside it
(``--official-dir``) and is imported, in processes of its own (the official package is also named
``psalm``), with ``--official-python-path`` first on ``PYTHONPATH``. Environment recipe:
docs/PERFORMANCE.md, "Side by side with the official code".

Steps (each a subprocess of this script, ``--role``, sharing a work directory):

1. ``dataset`` (here): N synthetic scenes written in the official eval formats: a RefCOCO-style
   json (``RefCOCO_dataset``) and a COCO panoptic val tree (``COCO_panoptic_dataset(is_train=False)``).
2. ``official-init`` (official env): builds the official ``PSALM`` (``llava_phi.py``), draws seeded
   random weights (per-key generators, the golden bundle's rule) and writes them as an official
   release directory (``model.safetensors``, ``config.json``, tokenizer files).
3. ``official-run`` (official env, measured): builds ``PSALM`` again, loads the release strictly,
   and runs every image as the official eval scripts do: the official data set class and
   ``DataCollatorForCOCODatasetV2`` (batch 1), then ``model.eval_seg(...)`` with the arguments of
   ``eval/referring_segmentation.py`` / ``eval/panoptic_segmentation.py``. Writes outputs, per-image
   seconds (the ``eval_seg`` call), Swin runs per image and peak RSS.
4. ``psalm-convert`` (psalm env): ``psalm.checkpoint.official.convert_official_release`` (strict).
5. ``psalm-run`` (psalm env, measured): ``PSALMPredictor.from_pretrained`` on the converted
   directory; each image goes through ``predictor.make_input`` (psalm's own preprocessing, checked
   equal to the official mapper's pixels) and ``predictor.run`` (timed).
6. here: compare the outputs and print ONE JSON line per task.

Measured process = build + weight load + the images; its peak RSS (``ru_maxrss``) covers all of it.

Deviations from a plain official run (all in memory, in our driver, never in the official tree):

* both sizes: the ``MultiScaleDeformableAttention`` CUDA op is an empty stub module, so the
  official ``MSDeformAttn`` runs its PyTorch fallback (what it does without the compiled op);
  detectron2 0.6's ``FixedSizeCrop`` gets the ``seg_pad_value`` argument of detectron2 master
  (the value the official mappers pass, 0, is fvcore's default: same pixels); weights are loaded
  in fp32 (the official ``load_pretrained_model`` loads fp16 then casts to fp32: it would round
  the random weights that psalm gets unrounded); one model serves both tasks, its task switched by
  setting ``SEG_TASK`` and calling the official ``mask_decoder_training_init`` (what
  ``load_pretrained_model``'s ``seg_task`` selects).
* ``--size tiny`` only: ``build_swin_b`` builds the official ``SwinTransformer`` with the tiny
  dimensions, and the projector's hard-coded inner width 2048 becomes the tiny 32
  (``projector_mid_dim``), as in the golden bundle ``psalm_e2e``. ``--size full`` runs the
  official classes unmodified (Swin-B, phi-1.5 sizes, 1024^2).

Usage::

    python tools/compare_official.py --size tiny --tasks referring panoptic --images 2 \\
        --official-dir /tmp/official_psalm \\
        --official-python-path /tmp/official_stubs:/tmp/official_site:/tmp/official_psalm

JSON line fields: ``task``, ``size``, ``images``, ``official_s_per_image`` / ``psalm_s_per_image``
(median over images; ``*_all`` lists every image), ``ratio_official_over_psalm``,
``official_peak_rss_mb`` / ``psalm_peak_rss_mb`` (``memory_kind`` ``cpu_max_rss``) and
``*_rss_after_load_mb``, ``official_backbone_runs_per_image`` / ``psalm_backbone_runs_per_image``,
``*_llm_length`` (LLM input length), ``inputs_equal`` (psalm's preprocessed pixels == the official
mapper's), then the agreement figures: referring ``top1_query_agreement`` (fraction of images
with the same top-1 query), ``top1_mask_iou_mean`` / ``_min``, ``top1_score_max_abs_diff``;
panoptic ``panoptic_pixel_agreement_mean`` / ``_min``, ``segments_info_equal`` (fraction),
``segments_matched`` (PQ-style: same category and IoU > 0.5, over the larger count),
``num_segments_official`` / ``_psalm``, ``sem_seg_argmax_agreement_mean``,
``sem_seg_max_prob_max_abs_diff``. Plus versions, threads and the command's settings.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Dict, List, Optional, Sequence

import numpy as np

logger = logging.getLogger("compare_official")

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_TOKENIZER = pathlib.Path(
    os.environ.get("PSALM_GOLDEN_DIR", REPO.parent / "shared" / "reference" / "golden")
) / "psalm_e2e" / "tokenizer"
TASKS = ("referring", "panoptic")
OFFICIAL_MODEL_FILE = "psalm/model/language_model/llava_phi.py"
OFFICIAL_MASK_CONFIG = "psalm/mask_config/maskformer2_swin_base_384_bs16_50ep.yaml"
OFFICIAL_COMMIT = "d5dbfda"
RECIPE = (
    "build it as in docs/PERFORMANCE.md, 'Side by side with the official code': "
    f"git --git-dir=<bare clone of zamling/PSALM> archive {OFFICIAL_COMMIT} psalm | tar -x -C /tmp/official_psalm; "
    "pip install --no-deps --target /tmp/official_site transformers==4.36.2 tokenizers==0.15.2 timm==0.6.13 ...; "
    "an empty /tmp/official_stubs/MultiScaleDeformableAttention.py"
)

# The two sizes. Official-side mask-config overrides (MODEL.*, INPUT.*) and Phi config; psalm-side config + opts.
SIZES: Dict[str, dict] = {
    "tiny": {
        "image_size": 256,
        "image_hw": (96, 128),
        "swin": {"embed_dim": 8, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "window_size": 12},
        "mask_cfg": {
            "MODEL.SWIN.EMBED_DIM": 8,
            "MODEL.SWIN.DEPTHS": [2, 2, 2, 2],
            "MODEL.SWIN.NUM_HEADS": [1, 2, 4, 8],
            "MODEL.SEM_SEG_HEAD.CONVS_DIM": 64,
            "MODEL.SEM_SEG_HEAD.MASK_DIM": 32,
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 2,
            "MODEL.MASK_FORMER.HIDDEN_DIM": 64,
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 10,
            "MODEL.MASK_FORMER.NHEADS": 4,
            "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 64,
            "MODEL.MASK_FORMER.DEC_LAYERS": 4,
            "INPUT.IMAGE_SIZE": 256,
        },
        "llm": {"vocab_size": 387, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4},
        "projector_mid_dim": 32,
        "classes": "tiny",
        "psalm_config": "configs/tiny/psalm_golden.yaml",
        # the official pixel decoder's FFN is hard-coded 1024 (llava_phi.pixel_decoder_init)
        "psalm_opts": ["MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD", "1024"],
        "warmup": 1,
    },
    "full": {
        "image_size": 1024,
        "image_hw": (480, 640),
        "swin": None,  # the official build_swin_b (Swin-B), unmodified
        "mask_cfg": {"INPUT.IMAGE_SIZE": 1024},
        "llm": {"vocab_size": 50297, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                "num_attention_heads": 32},
        "projector_mid_dim": None,  # the official ResNetSwin, inner width 2048
        "classes": "coco_panoptic",
        "psalm_config": "configs/coco/psalm_swin_base_phi15.yaml",
        "psalm_opts": [],
        "warmup": 0,
    },
}
LLM_COMMON = {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
              "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "qk_layernorm": False,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}
TINY_CLASSES = [  # (name, isthing): the golden bundle's panoptic categories
    ("person", 1), ("car", 1), ("tree-merged", 0),
]
SENTENCES = ["the {} shape on the left", "{} object"]


# =============================================================================== comparison (ours)
def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape; two empty masks agree (1.0)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def referring_agreement(official: Sequence[dict], ours: Sequence[dict]) -> dict:
    """Per-image records with ``top1_query`` (int), ``top1_mask`` (bool [H, W]), ``top1_score`` -> figures."""
    if len(official) != len(ours) or not official:
        raise ValueError(f"need the same, non-zero number of images: {len(official)} vs {len(ours)}")
    ious = [mask_iou(o["top1_mask"], p["top1_mask"]) for o, p in zip(official, ours)]
    same = [int(o["top1_query"]) == int(p["top1_query"]) for o, p in zip(official, ours)]
    diffs = [abs(float(o["top1_score"]) - float(p["top1_score"])) for o, p in zip(official, ours)]
    return {
        "top1_query_agreement": sum(same) / len(same),
        "top1_mask_iou_mean": float(np.mean(ious)),
        "top1_mask_iou_min": float(np.min(ious)),
        "top1_score_max_abs_diff": float(max(diffs)),
    }


def segments_matched(seg_a: np.ndarray, info_a: Sequence[dict], seg_b: np.ndarray, info_b: Sequence[dict]) -> float:
    """PQ-style matches (same category, IoU > 0.5: unique) over the larger segment count; 1.0 if both empty."""
    if not info_a and not info_b:
        return 1.0
    matched = 0
    for sa in info_a:
        for sb in info_b:
            if sa["category_id"] == sb["category_id"] and mask_iou(seg_a == sa["id"], seg_b == sb["id"]) > 0.5:
                matched += 1
                break
    return matched / max(len(info_a), len(info_b))


def panoptic_agreement(official: Sequence[dict], ours: Sequence[dict]) -> dict:
    """Per-image records with ``panoptic_seg`` (int [H, W]), ``segments_info`` (list of dicts),
    ``sem_argmax`` (int [H, W]) and ``sem_max`` (float [H, W]) -> figures."""
    if len(official) != len(ours) or not official:
        raise ValueError(f"need the same, non-zero number of images: {len(official)} vs {len(ours)}")
    pix, equal, match = [], [], []
    for o, p in zip(official, ours):
        a, b = np.asarray(o["panoptic_seg"]), np.asarray(p["panoptic_seg"])
        if a.shape != b.shape:
            raise ValueError(f"panoptic_seg shapes differ: {a.shape} vs {b.shape}")
        pix.append(float((a == b).mean()))
        norm = lambda info: [(int(s["id"]), bool(s["isthing"]), int(s["category_id"])) for s in info]  # noqa: E731
        equal.append(norm(o["segments_info"]) == norm(p["segments_info"]))
        match.append(segments_matched(a, o["segments_info"], b, p["segments_info"]))
    sem_agree = [float((np.asarray(o["sem_argmax"]) == np.asarray(p["sem_argmax"])).mean()) for o, p in zip(official, ours)]
    sem_diff = [float(np.abs(np.asarray(o["sem_max"], np.float64) - np.asarray(p["sem_max"], np.float64)).max())
                for o, p in zip(official, ours)]
    return {
        "panoptic_pixel_agreement_mean": float(np.mean(pix)),
        "panoptic_pixel_agreement_min": float(np.min(pix)),
        "segments_info_equal": sum(equal) / len(equal),
        "segments_matched": float(np.mean(match)),
        "num_segments_official": [len(o["segments_info"]) for o in official],
        "num_segments_psalm": [len(p["segments_info"]) for p in ours],
        "sem_seg_argmax_agreement_mean": float(np.mean(sem_agree)),
        "sem_seg_max_prob_max_abs_diff": float(max(sem_diff)),
    }


def timing_record(task: str, official: dict, ours: dict, agreement: dict, extra: Optional[dict] = None) -> dict:
    """The JSON line of one task from the two sides' measurement files (dicts) and the agreement figures."""
    off_t, our_t = list(official["seconds"]), list(ours["seconds"])
    if not off_t or not our_t:
        raise ValueError("no timed image on one side")
    off_s, our_s = statistics.median(off_t), statistics.median(our_t)
    rec = {
        "tool": "compare_official",
        "task": task,
        "images": len(our_t),
        "official_s_per_image": round(off_s, 4),
        "psalm_s_per_image": round(our_s, 4),
        "ratio_official_over_psalm": round(off_s / our_s, 3) if our_s > 0 else None,
        "official_s_per_image_all": [round(t, 4) for t in off_t],
        "psalm_s_per_image_all": [round(t, 4) for t in our_t],
        "official_peak_rss_mb": official["peak_rss_mb"],
        "psalm_peak_rss_mb": ours["peak_rss_mb"],
        "official_rss_after_load_mb": official.get("rss_after_load_mb"),
        "psalm_rss_after_load_mb": ours.get("rss_after_load_mb"),
        "memory_kind": "cpu_max_rss",
        "official_backbone_runs_per_image": _mean(official["backbone_runs"]),
        "psalm_backbone_runs_per_image": _mean(ours["backbone_runs"]),
        "official_llm_length": official.get("llm_length"),
        "psalm_llm_length": ours.get("llm_length"),
    }
    rec.update(agreement)
    rec.update(extra or {})
    return rec


def _mean(values):
    return None if not values else float(np.mean(values))


# ================================================================================ argument checks
class UsageError(ValueError):
    """A bad command line: the message says what is wrong and how to fix it."""


def check_official_dir(path) -> pathlib.Path:
    p = pathlib.Path(path).expanduser()
    if not (p / OFFICIAL_MODEL_FILE).is_file():
        raise UsageError(
            f"--official-dir {p}: no {OFFICIAL_MODEL_FILE} there (the extracted official tree, commit "
            f"{OFFICIAL_COMMIT}, whose 'psalm' folder holds the official package); {RECIPE}"
        )
    return p.resolve()


def check_official_python_path(value: str, official_dir: pathlib.Path) -> str:
    entries = [e for e in value.split(os.pathsep) if e]
    if not entries:
        raise UsageError(f"--official-python-path is empty; {RECIPE}")
    missing = [e for e in entries if not pathlib.Path(e).is_dir()]
    if missing:
        raise UsageError(f"--official-python-path entries do not exist: {missing}; {RECIPE}")
    if not any((pathlib.Path(e) / "MultiScaleDeformableAttention.py").is_file()
               or list(pathlib.Path(e).glob("MultiScaleDeformableAttention*.so")) for e in entries):
        raise UsageError(f"--official-python-path has no MultiScaleDeformableAttention module (the stub); {RECIPE}")
    if not any((pathlib.Path(e) / "transformers").is_dir() for e in entries):
        raise UsageError(f"--official-python-path has no transformers (the official pin 4.36.2); {RECIPE}")
    if str(official_dir) not in {str(pathlib.Path(e).resolve()) for e in entries}:
        entries.append(str(official_dir))  # the official tree itself must be importable
    return os.pathsep.join(entries)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny: the golden bundle's tiny model at 256^2 (seconds); full: Swin-B + phi-1.5 at 1024^2")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"any of {list(TASKS)}")
    p.add_argument("--images", type=int, default=2, help="synthetic images per task (timed)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs of the first image (default: tiny 1, full 0)")
    p.add_argument("--official-dir", default=os.environ.get("PSALM_OFFICIAL_DIR"),
                   help="the extracted official tree (holds psalm/model/...); env PSALM_OFFICIAL_DIR")
    p.add_argument("--official-python-path", default=os.environ.get("PSALM_OFFICIAL_PYTHONPATH"),
                   help="PYTHONPATH prefix of the official processes (stubs:site:tree); env PSALM_OFFICIAL_PYTHONPATH")
    p.add_argument("--work-dir", default=None, help="where data, release and outputs go (default: a new temp dir)")
    p.add_argument("--seed", type=int, default=20240698, help="seed of the random weights")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each side (default: OMP_NUM_THREADS or torch's)")
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p


def validate(args) -> None:
    """Raise :class:`UsageError` for a bad command line (before anything is built)."""
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        raise UsageError(f"--tasks {bad} not supported; choose from {list(TASKS)}")
    if len(set(args.tasks)) != len(args.tasks):
        raise UsageError(f"--tasks lists a task twice: {args.tasks}")
    if args.images < 1:
        raise UsageError(f"--images must be >= 1, got {args.images}")
    if args.warmup is not None and args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if not args.official_dir:
        raise UsageError(f"--official-dir (or PSALM_OFFICIAL_DIR) is required; {RECIPE}")
    args.official_dir = check_official_dir(args.official_dir)
    if not args.official_python_path:
        raise UsageError(f"--official-python-path (or PSALM_OFFICIAL_PYTHONPATH) is required; {RECIPE}")
    args.official_python_path = check_official_python_path(args.official_python_path, args.official_dir)
    if args.size == "tiny" and not (GOLDEN_TOKENIZER / "tokenizer.json").is_file():
        raise UsageError(f"--size tiny needs the golden bundle's tokenizer {GOLDEN_TOKENIZER} (set PSALM_GOLDEN_DIR)")


# ======================================================================================= data set
def _scene(index: int, hw) -> tuple:
    """A deterministic scene: gradient background, a red ellipse (thing 0), a blue rectangle (thing 1),
    a green band (stuff 2), Gaussian noise. Returns (uint8 [H, W, 3], {class index: bool mask})."""
    h, w = hw
    rng = np.random.default_rng(1000 + index)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([60 + 100 * xx / w, 80 + 60 * yy / h, 120 + 0 * xx], -1)
    cy, cx = h * (0.35 + 0.3 * rng.random()), w * (0.2 + 0.2 * rng.random())
    ell = ((yy - cy) / (0.22 * h)) ** 2 + ((xx - cx) / (0.12 * w)) ** 2 <= 1
    y0, x0 = int(h * (0.2 + 0.3 * rng.random())), int(w * (0.55 + 0.15 * rng.random()))
    rect = np.zeros((h, w), bool)
    rect[y0: y0 + h // 4, x0: x0 + w // 5] = True
    band = yy >= int(h * 0.8)
    img[band] = (40, 150, 50)
    img[rect] = (40, 60, 200)
    img[ell] = (210, 40, 40)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img, {0: ell & ~rect, 1: rect & ~ell, 2: band & ~rect & ~ell}


def _categories(kind: str) -> List[dict]:
    if kind == "tiny":
        return [{"id": i + 1, "name": n, "isthing": t, "color": [0, 0, 0]} for i, (n, t) in enumerate(TINY_CLASSES)]
    from psalm.data.class_names import load_categories

    return [{"id": int(c["id"]), "name": c["name"], "isthing": int(c["isthing"]), "color": list(c.get("color", [0, 0, 0]))}
            for c in load_categories(kind)]


def _polygon(mask: np.ndarray) -> List[float]:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    c = max(contours, key=cv2.contourArea).reshape(-1, 2)
    return [float(v) for v in c.flatten()]


def write_dataset(root: pathlib.Path, n: int, size: dict) -> dict:
    """The synthetic images in the official eval formats. Returns the per-image prompts (for psalm)."""
    from PIL import Image

    cats = _categories(size["classes"])
    # the scene's three regions use the first two thing categories and the first stuff category
    things = [c for c in cats if c["isthing"]][:2]
    stuff = [c for c in cats if not c["isthing"]][:1]
    region_cats = things + stuff
    for sub in ("val2017", "panoptic_val2017", "annotations", "refcoco_images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    refs, pan_anns, pan_imgs, prompts = [], [], [], []
    for i in range(n):
        img, masks = _scene(i, size["image_hw"])
        h, w = img.shape[:2]
        name = f"{i:012d}"
        # PNG bytes under the .jpg name the official panoptic data set hard-codes (PIL decodes by content)
        Image.fromarray(img).save(root / "val2017" / f"{name}.jpg", format="PNG")
        Image.fromarray(img).save(root / "refcoco_images" / f"{name}.jpg", format="PNG")
        ids = np.zeros((h, w), np.int64)
        segs = []
        for k, m in masks.items():
            sid = k + 1
            ids[m] = sid
            ys, xs = np.nonzero(m)
            segs.append({"id": sid, "category_id": region_cats[k]["id"], "iscrowd": 0, "area": int(m.sum()),
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]})
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic_val2017" / f"{name}.png")
        pan_anns.append({"image_id": i, "file_name": f"{name}.png", "segments_info": segs})
        pan_imgs.append({"id": i, "file_name": f"{name}.jpg", "height": h, "width": w})
        target = masks[i % 2]
        ys, xs = np.nonzero(target)
        color = ("red", "blue")[i % 2]
        sentences = [s.format(color) for s in SENTENCES]
        refs.append({
            "new_img_id": i,
            "image_info": {"file_name": f"{name}.jpg", "height": h, "width": w},
            "instruction": [{"sent": s} for s in sentences],
            "anns": [{"segmentation": [_polygon(target)], "category_id": (1, 3)[i % 2],  # COCO person / car
                      "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                      "iscrowd": 0, "area": int(target.sum())}],
        })
        prompts.append({"file": str(root / "val2017" / f"{name}.jpg"), "sentences": sentences})
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(
        {"images": pan_imgs, "annotations": pan_anns, "categories": cats}))
    (root / "refcoco_val.json").write_text(json.dumps(refs))
    return {"images": prompts, "class_names": [c["name"] for c in cats], "is_thing": [bool(c["isthing"]) for c in cats]}


def full_size_tokenizer(directory: pathlib.Path, vocab_size: int) -> pathlib.Path:
    """A stand-in for phi-1_5's tokenizer with exactly ``vocab_size`` rows, [PAD] and [SEG] last (as in
    the PSALM release). psalm's tiny byte-level BPE plus unused tokens: prompts tokenise to MORE tokens
    than with phi-1_5 (docs/PERFORMANCE.md), identically on both sides."""
    if (directory / "tokenizer.json").is_file():
        return directory
    from psalm.data.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(add_psalm_tokens=False)
    tok.add_tokens([f"<|unused_{i}|>" for i in range(vocab_size - 2 - len(tok))])
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.add_tokens(["[SEG]"])
    if len(tok) != vocab_size:
        raise RuntimeError(f"stand-in tokenizer has {len(tok)} entries, expected {vocab_size}")
    tok.model_max_length = 2048
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    # transformers 5 names its backend class; the official transformers 4.36 reads the fast tokenizer by this name
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=1))
    # and its tokenizers 0.15 reads BPE merges as "a b" strings only (newer versions write [a, b] pairs)
    tj_path = directory / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    tj["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    tj["model"].pop("ignore_merges", None)
    # the unused rows as (unreachable) BPE vocabulary entries, not ~50k added tokens: transformers 4.36 loads
    # added tokens one by one (minutes); <|endoftext|> also in the vocabulary, as in phi-1_5's vocab.json
    keep = {"<|endoftext|>", "[PAD]", "[SEG]"}
    for a in tj["added_tokens"]:
        if a["content"] not in ("[PAD]", "[SEG]"):
            tj["model"]["vocab"][a["content"]] = a["id"]
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] in keep]
    tj_path.write_text(json.dumps(tj, ensure_ascii=False))
    return directory


# ============================================================================ shared small helpers
def _record_panoptic(arrays: dict, i: int, out: dict) -> None:
    """Image ``i``'s panoptic output (either side: detectron2-format ``panoptic_seg`` and ``sem_seg``) into ``arrays``."""
    pan, segs = out["panoptic_seg"]
    arrays[f"{i}.panoptic_seg"] = pan.cpu().numpy()
    arrays[f"{i}.segments_info"] = np.array(json.dumps(segs))
    sem = out["sem_seg"].float().cpu()
    arrays[f"{i}.sem_argmax"] = sem.argmax(0).numpy().astype(np.int32)
    arrays[f"{i}.sem_max"] = sem.max(0).values.numpy()


def _finish_task(out_dir, side: str, task: str, rec: dict, arrays: dict, llm_len: list, results: dict) -> None:
    rec["llm_length"] = llm_len[0] if llm_len else None
    np.savez_compressed(out_dir / f"{side}_{task}.npz", **arrays)
    results["tasks"][task] = rec


def _write_side_results(out_dir, side: str, results: dict, rss_after_load) -> None:
    results["peak_rss_mb"] = _peak_rss_mb()
    results["rss_after_load_mb"] = rss_after_load
    (out_dir / f"{side}_results.json").write_text(json.dumps(results, indent=1))


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError):
        return None


def _set_threads(spec: dict) -> int:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    return torch.get_num_threads()


class _CallCounter:
    """Counts forward calls of a module (forward hook); ``take()`` returns and resets the count."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def randomize_(state: dict, seed: int) -> None:
    """Seeded random values for every floating tensor, in place (one generator per key: order-free).
    The golden bundle's rule: dim >= 2 N(0,1)/sqrt(fan_in); 1-D norm weights 1 + 0.1 N; biases 0.1 N;
    BN running_mean 0.1 N, running_var 0.5 + U(0,1); embeddings, queries, level embeds, sampling-offset
    biases and relative position tables N(0,1)."""
    import torch

    unit = ("seg_query", "embed_tokens", "sampling_offsets.bias", "level_embed", "query_embed", "query_feat",
            "relative_position_bias_table")
    for key in sorted(state):
        t = state[key]
        if not torch.is_floating_point(t):
            continue
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**62))
        n = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if key.endswith("running_var"):
            v = 0.5 + torch.rand(t.shape, generator=g, dtype=torch.float32)
        elif key.endswith("running_mean"):
            v = 0.1 * n
        elif any(u in key for u in unit):
            v = n
        elif t.dim() >= 2:
            v = n / max(1.0, float(t[0].numel())) ** 0.5
        elif key.endswith("bias"):
            v = 0.1 * n
        else:
            v = 1.0 + 0.1 * n
        with torch.no_grad():
            t.copy_(v.to(t.dtype))


# ================================================================================ official side
def _official_setup(spec: dict):
    """Imports of the official package with the in-memory adaptations listed in the module docstring."""
    import importlib
    import types

    if importlib.util.find_spec("matplotlib") is None:  # imported by Mask2Former_Simplify/utils/misc.py, unused
        sys.modules["matplotlib"] = types.ModuleType("matplotlib")
        sys.modules["matplotlib.pyplot"] = types.ModuleType("matplotlib.pyplot")
    import detectron2.data.transforms as T
    from fvcore.transforms.transform import PadTransform

    base = T.FixedSizeCrop
    if "seg_pad_value" not in base.__init__.__code__.co_varnames:
        class FixedSizeCropSegPad(base):  # detectron2 master's seg_pad_value argument (0.6 lacks it)
            def __init__(self, crop_size, pad=True, pad_value=128.0, seg_pad_value=255):
                super().__init__(crop_size, pad, pad_value)
                self.seg_pad_value = seg_pad_value

            def _get_pad(self, image):
                t = super()._get_pad(image)
                return PadTransform(t.x0, t.y0, t.x1, t.y1, t.orig_w, t.orig_h, self.pad_value, self.seg_pad_value)

        T.FixedSizeCrop = FixedSizeCropSegPad

    import psalm.model.language_model.llava_phi as llava_phi

    if not llava_phi.__file__.startswith(str(spec["official_dir"])):
        raise RuntimeError(f"'psalm' resolved to {llava_phi.__file__}, not the official tree {spec['official_dir']}: "
                           "put --official-python-path first on PYTHONPATH")
    size = SIZES[spec["size"]]
    if size["swin"] is not None:
        from psalm.model.multimodal_encoder.swin_trans import SwinTransformer

        sw = size["swin"]

        def build_tiny_swin(pretrain=None):
            return SwinTransformer(embed_dim=sw["embed_dim"], depths=sw["depths"], num_heads=sw["num_heads"],
                                   window_size=sw["window_size"], drop_path_rate=0.0, out_indices=(0, 1, 2, 3))

        llava_phi.build_swin_b = build_tiny_swin
    if size["projector_mid_dim"] is not None:
        import torch.nn as nn
        from psalm.model.multimodal_projector import builder

        mid = int(size["projector_mid_dim"])

        class NarrowResNetSwin(builder.ResNetSwin):  # the inner width as an argument, as the golden bundle's patch 1
            def __init__(self, dcn=None, input_dim=1024, out_dim=4096):
                nn.Module.__init__(self)
                self.dcn, self.inplanes = dcn, input_dim
                self.layer1 = self._make_layer(builder.BasicBlock, mid, 1, stride=2, dcn=dcn)
                self.fc = nn.Linear(mid, out_dim)

        builder.ResNetSwin = NarrowResNetSwin
    return llava_phi


def _official_mask_cfg(spec: dict, task: str):
    from psalm.train.train_datasets import get_mask_config

    cfg = get_mask_config(str(pathlib.Path(spec["official_dir"]) / OFFICIAL_MASK_CONFIG))
    for key, value in SIZES[spec["size"]]["mask_cfg"].items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg.MODEL.MASK_FORMER.SEG_TASK = task
    return cfg


def _official_config(spec: dict, llava_phi):
    size = SIZES[spec["size"]]
    swin_c = (size["swin"] or {"embed_dim": 128})["embed_dim"] * 8
    cfg = llava_phi.LlavaConfig(**size["llm"], **LLM_COMMON)
    cfg.mm_vision_tower = "random_weights_for_compare_official"
    cfg.mm_projector_type = "swin_conv"
    cfg.mm_input_embeds = swin_c
    cfg.projector_outdim = size["llm"]["hidden_size"]
    cfg.mask_decode_train = True
    cfg.swin_type = "base"
    if size["projector_mid_dim"] is not None:
        cfg.projector_mid_dim = size["projector_mid_dim"]  # read by psalm's converter; the official code ignores it
    cfg.torch_dtype = "float32"
    return cfg


def _build_official(spec: dict, first_task: str):
    import torch

    llava_phi = _official_setup(spec)
    config = _official_config(spec, llava_phi)
    with torch.no_grad():
        model = llava_phi.PSALM(config, mask_decoder_cfg=_official_mask_cfg(spec, first_task))
    return llava_phi, config, model


def role_official_init(spec: dict) -> None:
    import shutil

    from safetensors.torch import save_file

    _set_threads(spec)
    _, config, model = _build_official(spec, spec["tasks"][0])
    state = model.state_dict()
    randomize_(state, int(spec["seed"]))
    release = pathlib.Path(spec["release_dir"])
    release.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(release / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["architectures"] = ["PSALM"]
    (release / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in pathlib.Path(spec["tokenizer_dir"]).iterdir():
        if f.is_file():
            shutil.copyfile(f, release / f.name)
    logger.info("official release with %d keys (%.1f M parameters) in %s", len(state),
                sum(v.numel() for v in state.values()) / 1e6, release)


def role_official_run(spec: dict) -> None:
    import torch
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, __version__ as tf_version

    threads = _set_threads(spec)
    llava_phi, config, model = _build_official(spec, spec["tasks"][0])
    sd = load_file(str(pathlib.Path(spec["release_dir"]) / "model.safetensors"))
    model.load_state_dict(sd, strict=True)
    del sd
    model.to(dtype=torch.float32).eval()
    rss_after_load = _rss_mb()

    from psalm import conversation as conversation_lib
    from psalm.train.train_datasets import COCO_panoptic_dataset, DataCollatorForCOCODatasetV2, RefCOCO_dataset

    tokenizer = AutoTokenizer.from_pretrained(spec["release_dir"], use_fast=True)
    conversation_lib.default_conversation = conversation_lib.conv_templates["llava_phi"]
    data_args = argparse.Namespace(image_processor=model.get_model().get_vision_tower().image_processor,
                                   is_multimodal=True, refcoco_image_folder=str(pathlib.Path(spec["data_dir"]) / "refcoco_images"),
                                   image_folder=str(pathlib.Path(spec["data_dir"]) / "refcoco_images"))
    backbone = _CallCounter(model.get_model().get_vision_tower())
    llm_len: List[int] = []
    model.get_model().register_forward_pre_hook(
        lambda m, a, kw: llm_len.append(int(kw["inputs_embeds"].shape[1])) if kw.get("inputs_embeds") is not None else None,
        with_kwargs=True)
    # recording only: the query ids behind SEG_instance_inference's topk(sorted=False) rows (the same call)
    topk_ids: List[torch.Tensor] = []
    seg_inference = model.SEG_instance_inference

    def recording_seg_instance_inference(SEG_cls, mask_pred):
        topk_ids.append(torch.sigmoid(SEG_cls).flatten(0, 1).topk(model.test_topk_per_image, sorted=False)[1])
        return seg_inference(SEG_cls, mask_pred)

    model.SEG_instance_inference = recording_seg_instance_inference
    results = {"threads": threads, "torch": torch.__version__, "transformers": tf_version, "tasks": {}}
    out_dir = pathlib.Path(spec["out_dir"])
    for task in spec["tasks"]:
        mask_cfg = _official_mask_cfg(spec, task)
        model.mask_decoder_cfg = mask_cfg
        model.mask_decoder_training_init(mask_cfg)  # the task switch (load_pretrained_model's seg_task)
        collator = DataCollatorForCOCODatasetV2(tokenizer=tokenizer)
        if task == "referring":
            dataset = RefCOCO_dataset(json_path=str(pathlib.Path(spec["data_dir"]) / "refcoco_val.json"),
                                      tokenizer=tokenizer, data_args=data_args)
        else:
            dataset = COCO_panoptic_dataset(json_path=spec["data_dir"], tokenizer=tokenizer, data_args=data_args,
                                            is_train=False)
        loader = DataLoader(dataset, batch_size=1, collate_fn=collator, num_workers=0)
        batches = list(loader)

        def call(inputs):
            if task == "referring":  # eval/referring_segmentation.py
                return model.eval_seg(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      images=inputs["images"].float(), seg_info=inputs["seg_info"],
                                      token_refer_id=inputs["token_refer_id"],
                                      refer_embedding_indices=inputs["refer_embedding_indices"], labels=inputs["labels"])
            return model.eval_seg(  # eval/panoptic_segmentation.py
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], images=inputs["images"].float(),
                seg_info=inputs["seg_info"], class_name_embedding_indices=inputs["class_name_embedding_indices"],
                class_name_ids=inputs["class_name_ids"], cls_indices=inputs["cls_indices"], labels=inputs["labels"],
                is_thing_list=dataset.coco_is_thing)

        rec = {"seconds": [], "backbone_runs": [], "llm_length": None}
        arrays: Dict[str, np.ndarray] = {}
        with torch.no_grad():
            for _ in range(int(spec["warmup"])):
                call(batches[0])
            backbone.take(), llm_len.clear(), topk_ids.clear()
            for i, inputs in enumerate(batches):
                t0 = time.perf_counter()
                outputs = call(inputs)
                rec["seconds"].append(time.perf_counter() - t0)
                rec["backbone_runs"].append(backbone.take())
                info = inputs["seg_info"][0]
                # the mapper's padded uint8 pixels (to check psalm's preprocessing against)
                from detectron2.data import detection_utils as utils

                orig = utils.read_image(info["file_name"], format="RGB")
                arrays[f"{i}.image_u8"] = info["transforms"].apply_image(orig).transpose(2, 0, 1).copy()
                out = outputs[0]
                if task == "referring":
                    inst = out["instances"]
                    scores = inst.scores.cpu()
                    j = int(torch.topk(scores, 1)[1][0])  # compute_metric's pick
                    arrays[f"{i}.top1_mask"] = inst.pred_masks[j].cpu().numpy().astype(bool)
                    arrays[f"{i}.top1_query"] = np.array(int(topk_ids[-1][j]))
                    arrays[f"{i}.top1_score"] = np.array(float(scores[j]))
                else:
                    _record_panoptic(arrays, i, out)
                logger.info("official %s image %d: %.3f s", task, i, rec["seconds"][-1])
        _finish_task(out_dir, "official", task, rec, arrays, llm_len, results)
    _write_side_results(out_dir, "official", results, rss_after_load)


# =================================================================================== psalm side
def _psalm_opts(spec: dict) -> List[str]:
    return list(SIZES[spec["size"]]["psalm_opts"]) + ["MODEL.DEVICE", "cpu", "TEST.PSALM.DTYPE", "fp32"]


def role_psalm_convert(spec: dict) -> None:
    from psalm.checkpoint.official import convert_official_release
    from psalm.config import get_psalm_cfg

    cfg = get_psalm_cfg(str(REPO / SIZES[spec["size"]]["psalm_config"]), _psalm_opts(spec))
    result = convert_official_release(spec["release_dir"], spec["converted_dir"], cfg)  # strict: raises on any mismatch
    logger.info("converted: %s", result.report.format())


def role_psalm_run(spec: dict) -> None:
    import torch
    import transformers

    from psalm.predictor import PSALMPredictor
    from psalm.utils.image_io import load_image

    threads = _set_threads(spec)
    predictor = PSALMPredictor.from_pretrained(spec["converted_dir"], opts=_psalm_opts(spec), device="cpu")
    rss_after_load = _rss_mb()
    model = predictor.model
    backbone = _CallCounter(model.backbone)
    llm_len: List[int] = []
    body = getattr(model.llm, "model", model.llm)
    body.register_forward_pre_hook(
        lambda m, a, kw: llm_len.append(int(kw["inputs_embeds"].shape[1])) if kw.get("inputs_embeds") is not None else None,
        with_kwargs=True)
    data = json.loads((pathlib.Path(spec["data_dir"]) / "prompts.json").read_text())
    results = {"threads": threads, "torch": torch.__version__, "transformers": transformers.__version__, "tasks": {}}
    out_dir = pathlib.Path(spec["out_dir"])
    for task in spec["tasks"]:
        official = np.load(out_dir / f"official_{task}.npz")
        inputs, equal = [], []
        for i, item in enumerate(data["images"]):
            img = load_image(item["file"])
            if task == "referring":
                inp = predictor.make_input(img, "referring", text=item["sentences"])
            else:
                inp = predictor.make_input(img, "panoptic", classes=data["class_names"], is_thing=data["is_thing"])
            equal.append(bool(np.array_equal(inp["image"].numpy(), official[f"{i}.image_u8"])))
            inputs.append(inp)
        rec = {"seconds": [], "backbone_runs": [], "llm_length": None, "inputs_equal": equal}
        arrays: Dict[str, np.ndarray] = {}
        for _ in range(int(spec["warmup"])):
            predictor.run([inputs[0]])
        backbone.take(), llm_len.clear()
        for i, inp in enumerate(inputs):
            t0 = time.perf_counter()
            out = predictor.run([inp])[0]
            rec["seconds"].append(time.perf_counter() - t0)
            rec["backbone_runs"].append(backbone.take())
            if task == "referring":
                inst = out["instances"]
                arrays[f"{i}.top1_mask"] = inst.pred_masks[0].cpu().numpy().astype(bool)
                arrays[f"{i}.top1_query"] = np.array(int(inst.pred_query_ids[0]))
                arrays[f"{i}.top1_score"] = np.array(float(inst.scores[0]))
            else:
                _record_panoptic(arrays, i, out)
            logger.info("psalm %s image %d: %.3f s", task, i, rec["seconds"][-1])
        _finish_task(out_dir, "psalm", task, rec, arrays, llm_len, results)
    _write_side_results(out_dir, "psalm", results, rss_after_load)


# ========================================================================================= main
def load_records(npz_path: pathlib.Path, task: str, n: int) -> List[dict]:
    """The per-image output records of one side (the ``*.npz`` the run roles write)."""
    z = np.load(npz_path)
    keys = ("top1_mask", "top1_query", "top1_score") if task == "referring" else (
        "panoptic_seg", "segments_info", "sem_argmax", "sem_max")
    recs = []
    for i in range(n):
        r = {k: z[f"{i}.{k}"] for k in keys}
        if "segments_info" in r:
            r["segments_info"] = json.loads(str(r["segments_info"]))
        recs.append(r)
    return recs


def _child(role: str, spec_path: pathlib.Path, env: dict, what: str) -> None:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--role", role, "--spec", str(spec_path)]
    logger.info("%s: %s", what, " ".join(shlex.quote(c) for c in cmd))
    t0 = time.perf_counter()
    # the children log to stderr; their stdout too (the official code prints), so that stdout holds only JSON lines
    proc = subprocess.run(cmd, env=env, cwd=str(spec_path.parent), stdout=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); its log is above")
    logger.info("%s done in %.1f s", what, time.perf_counter() - t0)


def run(args) -> List[dict]:
    size = SIZES[args.size]
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="psalm_compare_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data_dir, out_dir = work / "data", work / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = write_dataset(data_dir, args.images, size)
    (data_dir / "prompts.json").write_text(json.dumps(prompts))
    tok = GOLDEN_TOKENIZER if args.size == "tiny" else full_size_tokenizer(work / "tokenizer", size["llm"]["vocab_size"])
    spec = {
        "size": args.size, "tasks": list(args.tasks), "images": args.images, "seed": args.seed,
        "warmup": size["warmup"] if args.warmup is None else args.warmup, "threads": args.threads,
        "official_dir": str(args.official_dir), "data_dir": str(data_dir), "out_dir": str(out_dir),
        "release_dir": str(work / "official_release"), "converted_dir": str(work / "psalm_converted"),
        "tokenizer_dir": str(tok),
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if args.threads:
        base_env["OMP_NUM_THREADS"] = str(args.threads)
    official_env = dict(base_env, PYTHONPATH=args.official_python_path)
    psalm_env = dict(base_env, PYTHONPATH=str(REPO))
    release = pathlib.Path(spec["release_dir"])
    if not (release / "model.safetensors").is_file():
        _child("official-init", spec_path, official_env, "official: random weights -> release")
    _child("official-run", spec_path, official_env, "official: measured run")
    if not (pathlib.Path(spec["converted_dir"]) / "model_final.pth").is_file():
        _child("psalm-convert", spec_path, psalm_env, "psalm: strict conversion of the release")
    _child("psalm-run", spec_path, psalm_env, "psalm: measured run")

    official = json.loads((out_dir / "official_results.json").read_text())
    ours = json.loads((out_dir / "psalm_results.json").read_text())
    records = []
    for task in args.tasks:
        o_rec = load_records(out_dir / f"official_{task}.npz", task, args.images)
        p_rec = load_records(out_dir / f"psalm_{task}.npz", task, args.images)
        agree = referring_agreement(o_rec, p_rec) if task == "referring" else panoptic_agreement(o_rec, p_rec)
        o_side = dict(official["tasks"][task], peak_rss_mb=official["peak_rss_mb"],
                      rss_after_load_mb=official["rss_after_load_mb"])
        p_side = dict(ours["tasks"][task], peak_rss_mb=ours["peak_rss_mb"], rss_after_load_mb=ours["rss_after_load_mb"])
        extra = {
            "size": args.size,
            "image_size": size["image_size"],
            "inputs_equal": all(ours["tasks"][task]["inputs_equal"]),
            "warmup": spec["warmup"],
            "official_torch_threads": official["threads"],
            "psalm_torch_threads": ours["threads"],
            "official_versions": {"torch": official["torch"], "transformers": official["transformers"],
                                  "commit": OFFICIAL_COMMIT},
            "psalm_versions": {"torch": ours["torch"], "transformers": ours["transformers"]},
            "work_dir": str(work),
        }
        records.append(timing_record(task, o_side, p_side, agree, extra))
    return records


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.role != "main":
        spec = json.loads(pathlib.Path(args.spec).read_text())
        roles = {"official-init": role_official_init, "official-run": role_official_run,
                 "psalm-convert": role_psalm_convert, "psalm-run": role_psalm_run}
        roles[args.role](spec)
        return 0
    try:
        validate(args)
    except UsageError as e:
        logger.error("%s", e)
        return 2
    from psalm.utils.profiling import emit_json

    for rec in run(args):
        emit_json(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
