#!/usr/bin/env python
"""PSALM demo: segment images (or a video) for any task and write overlays with labels and scores.

    python demo/demo.py --model output/tiny_synthetic --input img.png --output out/ \\
        --task panoptic --classes circle square triangle diamond wall floor --stuff wall floor
    python demo/demo.py --config-file configs/coco/psalm_swin_base_phi15.yaml --input photo.jpg \\
        --output out/ --opts MODEL.WEIGHTS checkpoints/psalm/model_final.pth MODEL.PSALM.TOKENIZER checkpoints/psalm
    python demo/demo.py ... --task referring --prompt "the white cup"
    python demo/demo.py ... --task interactive --points 240,150 100,60 --box 150,40,330,260
    python demo/demo.py ... --task instruction --prompt "What is in the image?"
    python demo/demo.py ... --video-input frames/ --first-frame-mask frames_0000.png --output vos_out/

``--model DIR`` takes a model directory (model_final.pth + config.yaml + tokenizer: the main job's
``output/tiny_synthetic``, or a converted release; :mod:`psalm.model_dir`). Without weights the demo
stops and says how to get a model; ``--random-weights`` runs a randomly initialised model on purpose
(meaningless masks: it only shows that the pipeline runs end to end). See demo/README.md.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import tempfile

import numpy as np
import torch
import tqdm
from PIL import Image

from detectron2.utils.logger import setup_logger

from psalm.config import get_psalm_cfg
from psalm.data.class_names import BENCHMARKS, load_categories
from psalm.modeling.tasks import CATEGORY_TASKS, SENTENCE_TASKS
from psalm.model_dir import MAIN_JOB_DIR, model_dir_cfg, no_model_message, resolve_weights
from psalm.predictor import PSALMPredictor, ensure_tokenizer, resolve_device
from psalm.utils import draw_prediction, load_image, parse_visual_prompts

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TASKS = ("panoptic", "instance", "semantic", "referring", "gres", "interactive", "instruction")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "coco", "psalm_swin_base_phi15.yaml")
logger = logging.getLogger("psalm.demo")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model options shared by demo.py and app.py (read by :func:`setup_cfg`)."""
    p.add_argument("--model", metavar="DIR",
                   help=f"a model directory (model_final.pth + config.yaml + tokenizer), e.g. {MAIN_JOB_DIR}")
    p.add_argument("--config-file", default="", metavar="FILE",
                   help="a config, with the weights in --opts MODEL.WEIGHTS (file or model directory); not with --model")
    p.add_argument("--random-weights", action="store_true",
                   help="run a randomly initialised model on purpose (meaningless masks: a pipeline check)")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PSALM demo (detectron2 style)")
    add_model_arguments(p)
    p.add_argument("--input", nargs="+", help="image files or glob patterns, e.g. 'dir/*.jpg'")
    p.add_argument("--video-input", help="video object segmentation: a folder of frames or a video file")
    p.add_argument("--first-frame-mask", help="VOS: label PNG of frame 0 (0 = background, k = object k)")
    p.add_argument("--output", help="output folder, or a file name when there is one input image")
    p.add_argument("--task", default="panoptic", choices=TASKS)
    p.add_argument("--prompt", help="referring / gres: the expression; instruction: the question")
    p.add_argument("--classes", nargs="+", help="category tasks: class names (also 'a,b,c'); default --vocabulary")
    p.add_argument("--stuff", nargs="+", default=[], help="panoptic: which of --classes are stuff (the rest are things)")
    p.add_argument("--vocabulary", default="coco_panoptic", choices=BENCHMARKS,
                   help="class list used when --classes is not given (default: the 133 COCO panoptic names)")
    p.add_argument("--points", nargs="+", metavar="X,Y", help="interactive: one region per point")
    p.add_argument("--box", action="append", metavar="X0,Y0,X1,Y1", help="interactive: a box region (repeatable)")
    p.add_argument("--scribble", action="append", metavar="X,Y;X,Y;...", help="interactive: a polyline (repeatable)")
    p.add_argument("--mask", action="append", metavar="PNG", help="interactive: a binary mask PNG (repeatable)")
    p.add_argument("--confidence-threshold", type=float, default=0.0, help="instance: hide detections below it")
    p.add_argument("--scale", type=float, default=0.0,
                   help="overlay scale (default 0: auto, a whole factor that makes the longer side >= 320 px)")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return p


def _numbers(text: str, n: int, what: str) -> list:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != n:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return vals


def split_names(values) -> list:
    """Class names from arguments / a text box: 'a,b' and ['a', 'b c'] both work; blanks are dropped."""
    if isinstance(values, str):
        values = [values]
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def setup_cfg(args):
    """The config of the demo's model: ``--model DIR`` (a model directory), or ``--config-file`` with
    ``--opts MODEL.WEIGHTS``. No weights is an error saying how to get a model, unless ``--random-weights``."""
    if args.model:
        if args.config_file:
            raise ValueError("give either --model DIR (its config.yaml is used) or --config-file, not both")
        if args.random_weights:
            raise ValueError("--random-weights with --model: a model directory has trained weights; drop one")
        cfg = model_dir_cfg(args.model, args.opts)
    else:
        cfg = get_psalm_cfg(args.config_file or DEFAULT_CONFIG, args.opts)
        if cfg.MODEL.WEIGHTS:
            resolve_weights(cfg.MODEL.WEIGHTS)  # a clear error for a missing file / empty model directory
        elif not args.random_weights:
            found = os.path.isfile(os.path.join(MAIN_JOB_DIR, "model_final.pth"))
            raise ValueError(
                f"the main job's trained model is in {MAIN_JOB_DIR}: pass --model {MAIN_JOB_DIR}" if found
                else no_model_message()
            )
    cfg = cfg.clone()
    cfg.defrost()
    resolve_device(cfg.MODEL.DEVICE)  # a CUDA device on a machine without CUDA is an error, never a silent CPU run
    cfg = ensure_tokenizer(cfg)
    cfg.freeze()
    return cfg


def build_prompt(args) -> dict:
    """The predictor keywords of the task from the command line."""
    if args.task in CATEGORY_TASKS:
        if args.classes:
            names = split_names(args.classes)
            stuff = split_names(args.stuff)
            unknown = sorted(set(stuff) - set(names))
            if unknown:
                raise ValueError(f"--stuff {unknown} are not among --classes {names}")
            return {"classes": names, "is_thing": [n not in stuff for n in names]}
        cats = load_categories(args.vocabulary)
        return {"classes": [c["name"] for c in cats], "is_thing": [bool(c["isthing"]) for c in cats]}
    if args.task in SENTENCE_TASKS:
        return {"text": args.prompt}
    if args.task == "instruction":
        return {"question": args.prompt}
    prompt = {}
    if args.points:
        prompt["points"] = [_numbers(p, 2, "--points") for p in args.points]
    if args.box:
        prompt["boxes"] = [_numbers(b, 4, "--box") for b in args.box]
    if args.scribble:
        prompt["scribbles"] = [[_numbers(xy, 2, "--scribble vertex") for xy in s.split(";") if xy] for s in args.scribble]
    if args.mask:
        prompt["masks"] = [np.asarray(Image.open(m).convert("L")) > 0 for m in args.mask]
    return prompt


def expand_inputs(patterns) -> list:
    paths = []
    for pattern in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pattern)))
        if not hits:
            raise SystemExit(f"error: --input {pattern!r} matches no file")
        paths.extend(hits)
    return paths


def output_path(args, in_path: str, n_inputs: int, text: bool = False) -> str:
    """Where the overlay (or, with ``text``, the chat answer .txt) of ``in_path`` goes."""
    out = args.output
    if os.path.splitext(out)[1].lower() in IMAGE_EXTS:
        if n_inputs != 1:
            raise SystemExit(f"error: --output {out!r} names one file but there are {n_inputs} inputs; give a folder")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        return os.path.splitext(out)[0] + ".txt" if text else out
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, os.path.splitext(os.path.basename(in_path))[0] + (".txt" if text else ".png"))


def overlay_scale(hw, scale: float = 0.0) -> float:
    """The overlay's scale: ``scale`` if positive, else the smallest whole factor that makes the longer
    side at least 320 px (labels stay readable on small images such as the 128 px synthetic ones)."""
    if scale and scale > 0:
        return float(scale)
    return float(max(1, -(-320 // max(hw))))


def filter_instances(prediction: dict, threshold: float) -> dict:
    if threshold <= 0 or "instances" not in prediction:
        return prediction
    inst = prediction["instances"]
    return {**prediction, "instances": inst[inst.scores >= threshold]}


def run_images(args, predictor: PSALMPredictor) -> None:
    paths = expand_inputs(args.input)
    for path in tqdm.tqdm(paths, desc="images", disable=len(paths) == 1):
        image = load_image(path)
        prompt = build_prompt(args)
        prediction = predictor(image, task=args.task, **prompt)
        regions = parse_visual_prompts(image.shape[:2], **prompt) if args.task == "interactive" else None
        overlay = draw_prediction(
            image, filter_instances(prediction, args.confidence_threshold), args.task,
            class_names=prompt.get("classes"), regions=regions, sentence=prompt.get("text"),
            scale=overlay_scale(image.shape[:2], args.scale),
        )
        summary = _summary(args.task, prediction)
        logger.info("%s: %s", path, summary)
        if args.output:
            target = output_path(args, path, len(paths))
            Image.fromarray(overlay).save(target)
            write_result_files(os.path.splitext(target)[0], prediction, args.task, prompt, regions)
            if "text" in prediction:
                with open(output_path(args, path, len(paths), text=True), "w", encoding="utf-8") as f:
                    f.write(str(prediction["text"]) + "\n")
        elif "text" in prediction:
            print(prediction["text"])


def write_result_files(stem: str, prediction: dict, task: str, prompt: dict, regions=None) -> list:
    """``<stem>.json`` (:func:`psalm.utils.export.prediction_record`) and, for tasks with masks,
    ``<stem>_masks.png`` (the label map: value k = segment k of the JSON). Returns the paths written."""
    import json

    from psalm.utils.export import prediction_label_map, prediction_record, save_label_map

    record = prediction_record(prediction, task, class_names=prompt.get("classes"), sentence=prompt.get("text"),
                               regions=regions)
    paths = []
    label_map = prediction_label_map(prediction, task)
    if label_map is not None:
        save_label_map(label_map, stem + "_masks.png")
        record["masks_png"] = os.path.basename(stem + "_masks.png")
        paths.append(stem + "_masks.png")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    paths.insert(0, stem + ".json")
    return paths


def _summary(task: str, prediction: dict) -> str:
    if "text" in prediction:
        return f"answer {str(prediction['text'])[:80]!r}"
    if "panoptic_seg" in prediction:
        return f"{len(prediction['panoptic_seg'][1])} segments"
    if "instances" in prediction:
        scores = prediction["instances"].scores.float().cpu().tolist()
        return f"{len(scores)} masks, scores {[round(s, 3) for s in scores[:5]]}"
    if "sem_seg" in prediction:
        return f"semantic map over {prediction['sem_seg'].shape[0]} classes"
    return f"keys {sorted(prediction)}"


def read_frames(source: str) -> list:
    """Frame paths of a folder (sorted), or frames decoded from a video file into a temporary folder."""
    if os.path.isdir(source):
        frames = sorted(f for f in glob.glob(os.path.join(source, "*")) if f.lower().endswith(IMAGE_EXTS))
        if not frames:
            raise SystemExit(f"error: --video-input folder {source!r} holds no image")
        return frames
    if not os.path.isfile(source):
        raise SystemExit(f"error: --video-input {source!r} is neither a folder nor a file")
    import cv2

    cap = cv2.VideoCapture(source)
    tmp = tempfile.mkdtemp(prefix="psalm_frames_")
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        path = os.path.join(tmp, f"{len(frames):05d}.png")
        cv2.imwrite(path, bgr)
        frames.append(path)
    cap.release()
    logger.info("decoded %d frames of %s into %s", len(frames), source, tmp)
    if not frames:
        raise SystemExit(f"error: could not decode any frame from {source!r}")
    return frames


def run_video(args, predictor: PSALMPredictor) -> None:
    if not args.first_frame_mask:
        raise SystemExit("error: --video-input needs --first-frame-mask (label PNG of frame 0)")
    if not args.output:
        raise SystemExit("error: --video-input needs --output (a folder)")
    frames = read_frames(args.video_input)
    with Image.open(args.first_frame_mask) as im:
        label = np.asarray(im if im.mode in ("P", "L", "I", "I;16") else im.convert("L")).astype(np.int64)
    logger.info("video: %d frames", len(frames))
    os.makedirs(os.path.join(args.output, "masks"), exist_ok=True)
    for path, result in tqdm.tqdm(zip(frames, predictor.predict_video(frames, label)), total=len(frames), desc="frames"):
        image = load_image(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(result.label_map).save(os.path.join(args.output, "masks", stem + ".png"))
        inst = _video_instances(result, image.shape[:2])
        overlay = draw_prediction(image, {"instances": inst}, "interactive")
        Image.fromarray(overlay).save(os.path.join(args.output, stem + ".png"))


def _video_instances(result, hw):
    """Painted (non-overlapping) object masks of a :class:`psalm.inference.FrameResult`."""
    from detectron2.structures import Instances

    inst = Instances(hw)
    inst.pred_masks = torch.from_numpy(np.stack([result.label_map == o for o in result.object_ids]))
    inst.scores = torch.from_numpy(np.asarray(result.scores, dtype=np.float32))
    return inst


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="psalm")
    setup_logger(name="fvcore")
    logger.info("Arguments: %s", args)
    if bool(args.input) == bool(args.video_input):
        raise SystemExit("error: give exactly one of --input and --video-input")
    try:
        run(args, PSALMPredictor(setup_cfg(args)))
    except (ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    return 0


def run(args, predictor: PSALMPredictor) -> None:
    """Run the parsed command line with a ready predictor (video or images)."""
    if args.video_input:
        run_video(args, predictor)
    else:
        run_images(args, predictor)


if __name__ == "__main__":
    sys.exit(main())
