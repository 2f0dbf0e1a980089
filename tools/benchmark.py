#!/usr/bin/env python
"""PSALM speed and memory: inference latency / throughput per image and training iteration time.

Prints ONE JSON line per measurement with: config, task, mode, device, dtype, batch_size,
image_size (padded model input S), warmup, iters, latency_ms_median / latency_ms_mean (per forward
or per training iteration of one batch), images_per_s, peak_memory_mb and memory_kind
(``cuda_max_memory_allocated`` on GPU, ``cpu_max_rss`` = the process's peak RSS on CPU; see
:mod:`psalm.utils.profiling`). With ``--mode both`` on CPU each mode runs in its own process so
that each RSS peak belongs to its measurement.

The inputs are synthetic scenes of S x S pixels (:func:`psalm.data.synthetic.generate_scene`, the
project's synthetic data set), converted by the predictor's input path; training targets are the
scene's object masks. Weights are ``MODEL.WEIGHTS`` (empty: random; speed does not depend on them).

    python tools/benchmark.py --config-file configs/tiny/Base-PSALM-tiny.yaml --task panoptic --iters 5
    python tools/benchmark.py --config-file configs/coco/psalm_swin_base_phi15.yaml --task referring \\
        --mode both --batch-size 4 --opts MODEL.DEVICE cuda MODEL.PSALM.TOKENIZER checkpoints/phi-1_5

``--classes coco_panoptic`` prompts the category tasks with the 133 COCO panoptic names (the
evaluation's prompt) instead of the synthetic data set's few. ``--profile DIR`` runs the timed
iterations under ``torch.profiler`` and writes ``DIR/<task>_<mode>_ops.txt`` (operators by self
time), ``DIR/<task>_<mode>_modules.txt`` (time per module scope: backbone, pixel decoder, LLM...)
and a Chrome trace; the JSON line then times the profiled run (profiling adds overhead).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import numpy as np
import torch

from psalm.config import get_psalm_cfg
from psalm.data.mapper import resize_pad_masks
from psalm.data.prompt import prompt_for_input
from psalm.data.synthetic import CLASS_NAMES, STUFF_CLASSES, THING_CLASSES, SyntheticSpec, generate_scene
from psalm.predictor import PSALMPredictor, autocast_context, ensure_tokenizer, resolve_device
from psalm.utils.profiling import MemoryMeter, StageTimer, emit_json, latency_stats, profiled, time_iterations

logger = logging.getLogger("psalm.benchmark")
TASKS = ("panoptic", "instance", "semantic", "referring", "gres", "interactive", "instruction")
MODES = ("inference", "train")
# sub-modules timed per stage (StageTimer): the image encoder, pixel decoder, projector, LLM, mask decoder
STAGES = ("backbone", "pixel_decoder", "projector", "llm.model", "predictor")


def _scene(size: int, index: int):
    image, objects, wall = generate_scene(SyntheticSpec(image_size=size), "train", index)
    if not objects:
        raise RuntimeError(f"synthetic scene {index} has no object")
    return image, objects, wall


def make_sample(predictor: PSALMPredictor, task: str, index: int, train: bool, classes: str = "synthetic",
                prompts: str = "data") -> dict:
    """One model input dict for ``task`` on synthetic scene ``index`` (plus GT when ``train``).

    ``prompts``: ``"data"`` gives the input its ``"prompt"`` as the data loader's mapper does (built
    before the timed step, in the loader's workers in a real run); ``"model"`` leaves it to the model's
    forward (the path of hand-made inputs, and of every input before prompts moved to the data path).

    ``classes``: the category prompt of panoptic / instance / semantic, ``"synthetic"`` (the data
    set's classes) or a :mod:`psalm.data.class_names` benchmark such as ``"coco_panoptic"`` (133;
    the scene's objects are then labelled with its first classes for the training targets)."""
    size = predictor.image_size
    image, objects, wall = _scene(size, index)
    obj = objects[0]
    things = np.zeros(wall.shape, dtype=bool)
    for o in objects:
        things |= o["mask"]
    if task in ("panoptic", "instance", "semantic"):
        gt = [o["mask"] for o in objects] + [wall & ~things, ~wall & ~things]
        if classes == "synthetic":
            names = list(CLASS_NAMES)
            prompt = {"classes": names, "is_thing": [c in THING_CLASSES for c in names]}
            gt_classes = [THING_CLASSES.index(o["shape"]) for o in objects] + [
                CLASS_NAMES.index(s) for s in STUFF_CLASSES]
        else:
            from psalm.data.class_names import load_categories

            cats = load_categories(classes)
            prompt = {"classes": [c["name"] for c in cats], "is_thing": [bool(c["isthing"]) for c in cats]}
            thing_ids = [i for i, c in enumerate(cats) if c["isthing"]]
            stuff_ids = [i for i, c in enumerate(cats) if not c["isthing"]]
            gt_classes = [thing_ids[THING_CLASSES.index(o["shape"])] for o in objects] + stuff_ids[:2]
    elif task in ("referring", "gres"):
        prompt = {"text": f"the {obj['color']} {obj['shape']}"}
        gt, gt_classes = [obj["mask"]], [0]
    elif task == "interactive":
        prompt = {"points": [[o["center"]] for o in objects]}
        gt, gt_classes = [o["mask"] for o in objects], [0] * len(objects)
    elif task == "instruction":
        prompt = {"question": "Describe the image briefly."}
        gt, gt_classes = None, None
    else:
        raise ValueError(f"unknown task {task!r}")
    inp = predictor.make_input(image, task, **prompt)
    if train:
        if task == "instruction":
            inp["conversation"] = inp["conversation"] + [
                {"from": "gpt", "value": f"A {obj['color']} {obj['shape']} in front of a wall."}]
        else:
            from detectron2.structures import Instances

            inst = Instances((size, size))
            inst.gt_masks = resize_pad_masks(np.stack(gt), (size, size), size)
            inst.gt_classes = torch.tensor(gt_classes, dtype=torch.int64)
            inp["instances"] = inst
    if prompts == "data":
        model = predictor.model
        inp["prompt"] = prompt_for_input(
            model.prompt_builder, inp, shuffle_classes=train and model.shuffle_classes_train,
            rng=np.random.default_rng(index), generation=not train,
        )
    elif prompts != "model":
        raise ValueError(f"prompts must be 'data' or 'model', got {prompts!r}")
    return inp


def stand_in_tokenizer(directory: str, vocab_size: int) -> str:
    """A tokenizer with exactly ``vocab_size`` entries for timing a full-size model without phi-1_5's.

    psalm's tiny byte-level BPE (:func:`psalm.data.tokenizer.build_tiny_tokenizer`, no PSALM
    tokens) plus unused added tokens ``<|unused_i|>`` up to ``vocab_size - 2`` entries; then
    :func:`psalm.modeling.llm.load_tokenizer` adds ``[PAD]`` and ``[SEG]`` as the last two rows,
    as with phi-1_5. Built once into ``directory``. Text tokenises to more tokens than with
    phi-1_5 (a few hundred merges instead of 50k), so LLM sequences are longer than the real ones.
    """
    import pathlib

    from psalm.data.tokenizer import build_tiny_tokenizer

    path = pathlib.Path(directory)
    if not (path / "tokenizer.json").is_file():
        tok = build_tiny_tokenizer(add_psalm_tokens=False)
        tok.add_tokens([f"<|unused_{i}|>" for i in range(vocab_size - 2 - len(tok))])
        if len(tok) != vocab_size - 2:
            raise RuntimeError(f"stand-in tokenizer has {len(tok)} entries, expected {vocab_size - 2}")
        path.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(path))
        logger.warning("built a stand-in tokenizer with %d entries in %s (not phi-1_5's: longer sequences)",
                       vocab_size, path)
    return str(path)


def _train_dtype(cfg, device: torch.device):
    if device.type == "cuda" and cfg.SOLVER.AMP.ENABLED:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.SOLVER.AMP.PRECISION]
    return None


def _dtype_name(dtype) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def measure(predictor: PSALMPredictor, task: str, mode: str, batch_size: int, iters: int, warmup: int,
            classes: str = "synthetic", profile_dir: str | None = None, optimizer_name: str = "adamw",
            prompts: str = "data") -> dict:
    """Time ``iters`` inference calls or training steps (``optimizer_name`` ``"adamw"``: forward,
    backward and an AdamW step; ``"none"``: forward + backward only) of one batch."""
    if optimizer_name not in ("adamw", "none"):
        raise ValueError(f"optimizer must be 'adamw' or 'none', got {optimizer_name!r}")
    model, device = predictor.model, predictor.device
    train = mode == "train"
    batch = [make_sample(predictor, task, i, train, classes, prompts) for i in range(batch_size)]
    if train:
        model.train()
        dtype = _train_dtype(predictor.cfg, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5) if optimizer_name == "adamw" else None
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

        def step():
            with autocast_context(device, dtype):
                losses = model(batch)
            loss = sum(v for v in losses.values() if isinstance(v, torch.Tensor) and v.requires_grad)
            if optimizer is None:  # forward + backward only
                for p in params:
                    p.grad = None
                loss.backward()
                return
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    else:
        model.eval()
        dtype = predictor.autocast_dtype

        def step():
            predictor.run(batch)

    stages = StageTimer(model, list(STAGES), device)
    seq_lens = []
    llm_body = dict(model.named_modules()).get("llm.model")
    hook = None if llm_body is None else llm_body.register_forward_pre_hook(
        lambda m, a, kw: seq_lens.append(tuple(kw["inputs_embeds"].shape[:2])) if "inputs_embeds" in kw else None,
        with_kwargs=True)
    with MemoryMeter(device) as mem, profiled(profile_dir, f"{task}_{mode}", device) as prof:

        def start():
            prof.start()
            stages.__enter__()

        try:
            times = time_iterations(step, iters, warmup, device, before_timed=start)
        finally:
            stages.__exit__()
            if hook is not None:
                hook.remove()
    model.eval()
    stats = latency_stats(times, batch_size)
    return {
        "mode": mode,
        "prompts": prompts,
        "optimizer": optimizer_name if train else None,
        "dtype": _dtype_name(dtype),
        "latency_ms_median": stats["latency_ms_median"],
        "latency_ms_mean": stats["latency_ms_mean"],
        "images_per_s": stats["items_per_s"],
        # forward time per timed iteration in each stage (gradient checkpointing re-runs count again)
        "stage_s_per_iter": {k: round(v / iters, 4) for k, v in stages.seconds.items()},
        "stage_calls_per_iter": {k: v / iters for k, v in stages.calls.items()},
        "llm_batch_and_length": list(seq_lens[0]) if seq_lens else None,  # [B, L] of the first LLM call
        **mem.report(),
    }


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", default="configs/coco/psalm_swin_base_phi15.yaml", metavar="FILE")
    p.add_argument("--task", default="panoptic", choices=TASKS)
    p.add_argument("--mode", default="inference", choices=MODES + ("both",))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--classes", default="synthetic",
                   help="category prompt of panoptic/instance/semantic: 'synthetic' or a psalm.data.class_names "
                        "benchmark, e.g. coco_panoptic (133 names)")
    p.add_argument("--optimizer", choices=("adamw", "none"), default="adamw",
                   help="train mode: 'adamw' (forward, backward, AdamW step) or 'none' (forward + backward only, "
                        "e.g. a full-size step on a machine without memory for the AdamW states)")
    p.add_argument("--stand-in-tokenizer", default=None, metavar="DIR",
                   help="full-size runs without the phi-1_5 tokenizer: build (once) and use a byte-level BPE "
                        "tokenizer padded with unused tokens to MODEL.PSALM.LLM.VOCAB_SIZE rows in DIR (prompts "
                        "then tokenise to more tokens than with phi-1_5: sequence lengths are reported)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run the timed iterations under torch.profiler; tables and a trace go to DIR")
    p.add_argument("--isolate", choices=("process", "none"), default="process",
                   help="--mode both on CPU: one process per mode so that each RSS peak is its own (default)")
    p.add_argument("--prompts", choices=("data", "model"), default="data",
                   help="where the prompts are tokenised: 'data' (the mapper's work, before the timed step, as in "
                        "training and evaluation) or 'model' (in the timed forward: hand-made inputs, and every "
                        "input before prompts moved to the data path)")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return p


def _child(args, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--config-file", args.config_file, "--task", args.task,
           "--mode", mode, "--batch-size", str(args.batch_size), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--classes", args.classes, "--optimizer", args.optimizer]
    if args.profile:
        cmd += ["--profile", args.profile]
    if args.stand_in_tokenizer:
        cmd += ["--stand-in-tokenizer", args.stand_in_tokenizer]
    if args.opts:
        cmd += ["--opts", *args.opts]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of mode {mode!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be >= 1")
    cfg = get_psalm_cfg(args.config_file, args.opts)
    cfg.defrost()
    try:  # a CUDA device on a machine without CUDA is an error: a CPU figure is not a GPU figure
        resolve_device(cfg.MODEL.DEVICE)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    modes = MODES if args.mode == "both" else (args.mode,)
    if len(modes) > 1 and args.isolate == "process" and cfg.MODEL.DEVICE == "cpu":
        for mode in modes:
            emit_json(_child(args, mode))
        return 0
    if args.stand_in_tokenizer:
        cfg.MODEL.PSALM.TOKENIZER = stand_in_tokenizer(args.stand_in_tokenizer, int(cfg.MODEL.PSALM.LLM.VOCAB_SIZE))
    cfg = ensure_tokenizer(cfg)
    predictor = PSALMPredictor(cfg)
    common = {
        "config": args.config_file,
        "task": args.task,
        "device": str(predictor.device),
        "batch_size": args.batch_size,
        "image_size": predictor.image_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "num_parameters": sum(p.numel() for p in predictor.model.parameters()),
        "classes": args.classes,
        "profiled": bool(args.profile),
        "torch_threads": torch.get_num_threads(),
    }
    for mode in modes:
        emit_json({**common, **measure(predictor, args.task, mode, args.batch_size, args.iters, args.warmup,
                                       args.classes, args.profile, args.optimizer, args.prompts)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
