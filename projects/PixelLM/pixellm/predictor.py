"""``PixelLMPredictor``: images + questions -> answers with the masks inline (one per target), batched.

    predictor = PixelLMPredictor.from_model_dir("models/pixellm-7b", opts=["MODEL.DEVICE", "cuda"])
    out = predictor(image, "What are the cups on the table?")
    out["text"]      # "the red cup <mask:0> and the blue cup <mask:1> ..."
    out["segments"]  # [{"phrase": "the red cup", "mask": bool [H, W], "score": float}, ...]

The codebook groups of the generated answer are replaced by ``<mask:i>`` placeholders in the text;
``segments[i]`` is the mask of group i and the phrase written before it. An answer whose codebook
tokens do not form complete groups gives no segments (warning logged by the model).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from psalm.predictor import resolve_device
from psalm.utils.image_io import load_image

from .data.prompt import build_conversation, tokenizer_image_token
from .modeling.vision import preprocess_clip_image

__all__ = ["PixelLMPredictor", "answer_segments", "draw_answer"]

_CONNECTORS = re.compile(r"^(?:and|,|;|:|\.|sure|they|it|are|is|the segmentation result of)\s*", re.I)


def _phrase(chunk: str) -> str:
    chunk = re.split(r"[,.;]| and ", chunk.strip())[-1].strip()
    chunk = re.sub(r"\s+(is|are)$", "", chunk).strip()
    while True:
        new = _CONNECTORS.sub("", chunk)
        if new == chunk:
            return chunk
        chunk = new


def answer_segments(text: str, masks: torch.Tensor, scores: torch.Tensor | None, group: str):
    """(text with ``<mask:i>`` placeholders, list of {phrase, mask, score})."""
    pieces = text.split(group)
    n = len(pieces) - 1
    if n != masks.shape[0]:  # incomplete groups: the model returned no masks
        return text, []
    out, segs = pieces[0], []
    for i in range(n):
        segs.append({"phrase": _phrase(pieces[i]), "mask": masks[i].cpu().numpy(),
                     "score": float(scores[i]) if scores is not None else None})
        out += f"<mask:{i}>" + pieces[i + 1]
    return out, segs


class PixelLMPredictor:
    def __init__(self, cfg, model=None):
        from .modeling.meta_arch import PixelLM

        self.cfg = cfg.clone()
        self.device = resolve_device(cfg.MODEL.DEVICE)
        self.model = (model or PixelLM(cfg)).to(self.device).eval()
        if self.model.tokenizer is None:
            raise ValueError("the predictor needs the model's tokenizer (MODEL.PIXELLM.TOKENIZER or the model "
                             "directory's tokenizer files, loadable in this environment)")
        self.tokenizer = self.model.tokenizer
        self.group = " ".join(f"[SEG{i}]" for i in range(len(self.model.codebook_ids)))
        p = cfg.MODEL.PIXELLM
        self.norm = {"pixel_mean": tuple(p.PIXEL_MEAN), "pixel_std": tuple(p.PIXEL_STD)}

    @classmethod
    def from_model_dir(cls, model_dir, opts: Sequence[str] = ()):
        from .config import get_pixellm_cfg

        return cls(get_pixellm_cfg(None, ["MODEL.PIXELLM.MODEL_DIR", str(model_dir), *opts]))

    def make_input(self, image, question: str) -> dict:
        rgb = load_image(image)
        clip, size = preprocess_clip_image(rgb, self.model.vision_tower.image_size, **self.norm)
        q = question if "<image>" in question else "<image>\n" + question
        ids = tokenizer_image_token(build_conversation(q), self.tokenizer)
        return {"clip_image": clip, "clip_size": size, "height": rgb.shape[0], "width": rgb.shape[1], "input_ids": [ids]}

    @torch.no_grad()
    def predict_batch(self, images: Sequence, questions: Sequence[str], max_new_tokens: int | None = None,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
        from .modeling.generation import generate

        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        inputs = [self.make_input(im, q) for im, q in zip(images, questions)]
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        results = generate(self.model, inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_p=top_p, generator=gen)
        outs = []
        for res in results:
            ans = res["answers"][0]
            raw = self.tokenizer.decode(ans["answer_ids"], skip_special_tokens=False)
            raw = raw.replace(self.tokenizer.eos_token or "", "").strip()
            text, segs = answer_segments(raw, ans["pred_masks"], ans["mask_scores"], self.group)
            outs.append({"text": text, "raw_text": raw, "segments": segs})
        return outs

    def __call__(self, image, question: str, **kwargs) -> dict:
        return self.predict_batch([image], [question], **kwargs)[0]


def draw_answer(image, prediction: dict, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB overlay: every segment's mask in its own colour, labelled with its phrase."""
    from detectron2.utils.visualizer import Visualizer

    from psalm.utils.visualizer import region_colors

    rgb = load_image(image)
    segs = prediction["segments"]
    vis = Visualizer(rgb)
    if segs:
        out = vis.overlay_instances(masks=[s["mask"] for s in segs], labels=[s["phrase"] or f"mask {i}"
                                    for i, s in enumerate(segs)], assigned_colors=list(region_colors(len(segs))),
                                    alpha=alpha)
    else:
        out = vis.output
    return out.get_image()
