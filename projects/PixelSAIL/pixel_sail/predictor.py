"""``PixelSAILPredictor``: image + text (+ optional visual prompts) -> answer text + masks.

The model is built through detectron2's ``META_ARCH_REGISTRY`` ("PixelSAIL") and loaded strictly from
``MODEL.WEIGHTS`` (psalm's checkpointer; missing or mis-shaped tensors are an error). No Pixel-SAIL
weights are published: an empty ``MODEL.WEIGHTS`` is an error unless ``allow_random_weights=True``
(tests, smoke runs), which logs a warning.

``predictor(image, text=None, question=None, task=None, points=None, boxes=None, scribbles=None,
masks=None)``:

* ``text``: a referring expression -> the official RES question "Please segment {text} in this image.";
  ``question``: any question (e.g. "What is the category of the region marked by <Prompt0>?");
* visual prompts (``psalm.utils.prompts`` conventions: original-image pixel coordinates, one region per
  entry, rasterised exactly as the training prompts) become ``<Prompt0>``, ``<Prompt1>``, ... in the order
  points, scribbles, boxes, masks; refer to them in ``question``;
* ``task``: "referring" (first mask), "gres" (union), "vt_res" (visual-prompt + text referring; forced
  "It is [SEG]." retry per ``TEST.FORCE_SEG``), or "chat" (text only). Default: "referring" when ``text``
  is given, else "vt_res" when the question mentions a prompt and asks to segment, else "chat".

Returns ``{"text", "masks" bool [n, H, W], "scores" [n], "regions" (the parsed prompts), "task"}``.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.modeling import build_model

from psalm.utils.image_io import load_image
from psalm.utils.prompts import parse_visual_prompts, rasterize_regions

from .data import prompt_inputs, referring_question
from .patchify import preprocess_image

logger = logging.getLogger(__name__)

__all__ = ["PixelSAILPredictor"]


class PixelSAILPredictor:
    def __init__(self, cfg, allow_random_weights: bool = False):
        from . import modeling  # noqa: F401  (registers META_ARCH "PixelSAIL")

        if cfg.MODEL.META_ARCHITECTURE != "PixelSAIL":
            raise ValueError(f"MODEL.META_ARCHITECTURE must be 'PixelSAIL', got {cfg.MODEL.META_ARCHITECTURE!r}")
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("MODEL.DEVICE is cuda but CUDA is not available; set MODEL.DEVICE cpu")
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        if cfg.MODEL.WEIGHTS:
            from psalm.engine.checkpoint import load_model_weights

            load_model_weights(self.model, cfg.MODEL.WEIGHTS)
        elif allow_random_weights:
            logger.warning("PixelSAILPredictor: MODEL.WEIGHTS is empty, the model is RANDOMLY initialised")
        else:
            raise ValueError("MODEL.WEIGHTS is empty: no Pixel-SAIL weights are published; train one "
                             "(projects/PixelSAIL/train_net.py) or convert an authors' checkpoint "
                             "(projects/PixelSAIL/convert_official.py)")
        self.model.eval()
        ps = cfg.MODEL.PIXEL_SAIL
        self.patch_size, self.max_side = ps.PATCH_SIZE, ps.MAX_IMAGE_SIDE
        self.mean, self.std = list(ps.PIXEL_MEAN), list(ps.PIXEL_STD)
        self.num_vp = ps.NUM_VISUAL_PROMPTS

    def make_input(self, image, text=None, question=None, task=None, points=None, boxes=None, scribbles=None,
                   masks=None) -> Dict:
        rgb = load_image(image)
        H, W = rgb.shape[:2]
        if (text is None) == (question is None):
            raise ValueError("give exactly one of text= (a referring expression) or question=")
        q = referring_question(text) if text is not None else question
        if not q.strip():
            raise ValueError("the text / question is empty")
        px = preprocess_image(rgb, self.patch_size, self.max_side, self.mean, self.std)
        grid = (px.shape[1] // self.patch_size, px.shape[2] // self.patch_size)
        inp = dict(pixel_values=px, grid_hw=grid, height=H, width=W, question=q, image_uint8=torch.from_numpy(rgb.copy()).permute(2, 0, 1))
        regions = []
        if any(v is not None for v in (points, boxes, scribbles, masks)):
            regions = parse_visual_prompts((H, W), points=points, scribbles=scribbles, boxes=boxes, masks=masks)
            if len(regions) > self.num_vp:
                raise ValueError(f"{len(regions)} visual prompts, the model has {self.num_vp} (<Prompt0..{self.num_vp - 1}>)")
            raster = rasterize_regions(regions, (H, W), self.cfg.INPUT.POINT_RADIUS, self.cfg.INPUT.SCRIBBLE_RADIUS)
            inp["vp_patch_masks"], inp["vp_ids"] = prompt_inputs(raster, grid, list(range(len(regions))))
        mentions = [k for k in range(self.num_vp) if f"<Prompt{k}>" in q]
        if any(k >= len(regions) for k in mentions):
            raise ValueError(f"the question mentions <Prompt{max(mentions)}> but only {len(regions)} visual prompt(s) were given")
        if task is None:
            task = "referring" if text is not None else ("vt_res" if mentions and "segment" in q.lower() else "chat")
        if task not in ("referring", "gres", "vt_res", "chat"):
            raise ValueError(f"task must be referring, gres, vt_res or chat, got {task!r}")
        inp["task"] = task
        return inp, regions

    @torch.no_grad()
    def __call__(self, image, **kwargs) -> Dict:
        inp, regions = self.make_input(image, **kwargs)
        out = self.model([inp])[0]
        res = {"text": out["text"], "task": inp["task"], "regions": regions}
        if "instances" in out:
            res["masks"] = out["instances"].pred_masks.numpy()
            res["scores"] = out["instances"].scores.numpy()
        else:
            res["masks"] = np.zeros((0, inp["height"], inp["width"]), bool)
            res["scores"] = np.zeros(0)
        return res
