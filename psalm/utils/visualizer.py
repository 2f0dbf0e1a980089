"""Overlays of PSALM predictions on the input image, drawn with detectron2's ``Visualizer``.

One entry point, :func:`draw_prediction`, for every task's output (``docs/DESIGN.md``, "Model
output"):

* ``panoptic``: ``Visualizer.draw_panoptic_seg`` (things labelled with their class, stuff with its
  name); ``instance``: masks with "class score%" labels; ``semantic``: ``draw_sem_seg`` of the
  per-pixel argmax;
* ``referring`` / ``gres``: the mask labelled with the (shortened) sentence and the score;
  ``no target`` written when the model predicts none;
* ``interactive``: one mask per region, in the colour of its prompt, with the prompt drawn on top
  (points as dots, scribbles as polylines, boxes as rectangles, mask prompts as outlines);
* ``instruction``: the image with the generated text written at the top.

Everything returned is a uint8 RGB [H * scale, W * scale, 3] array.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from detectron2.data.catalog import Metadata
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer

from .prompts import RegionPrompt

__all__ = ["draw_prediction", "region_colors"]

_PALETTE = colormap(rgb=True, maximum=1)


def region_colors(n: int) -> list:
    """``n`` distinct RGB colours in [0, 1] (detectron2's colormap, cycled)."""
    return [tuple(float(c) for c in _PALETTE[i % len(_PALETTE)]) for i in range(n)]


def _metadata(class_names: Optional[Sequence[str]]) -> Metadata:
    names = list(class_names) if class_names else []
    colors = [tuple(int(round(255 * c)) for c in col) for col in region_colors(len(names))]
    # our category ids index class_names for things and stuff alike
    return Metadata(name="psalm_predictor", thing_classes=names, stuff_classes=names, thing_colors=colors,
                    stuff_colors=colors)


def _shorten(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _draw_regions(vis: Visualizer, regions: Sequence[RegionPrompt], colors) -> None:
    radius = max(3, int(round(0.01 * max(vis.output.height, vis.output.width))))
    for region, color in zip(regions, colors):
        if region.kind == "point":
            for x, y in region.data:
                vis.draw_circle((float(x), float(y)), color="white", radius=radius + 2)
                vis.draw_circle((float(x), float(y)), color=color, radius=radius)
        elif region.kind == "scribble":
            xy = region.data if len(region.data) > 1 else np.repeat(region.data, 2, axis=0)
            vis.draw_line(xy[:, 0].tolist(), xy[:, 1].tolist(), color=color, linewidth=3)
        elif region.kind == "box":
            vis.draw_box(tuple(float(v) for v in region.data), alpha=1.0, edge_color=color)
        elif region.kind == "mask":
            vis.draw_binary_mask(region.data.astype(np.uint8), color=color, edge_color=color, alpha=0.0)


def _draw_banner(vis: Visualizer, text: str, color: str = "white") -> None:
    """A line of text at the top centre of the image (in original-image coordinates)."""
    w = vis.output.width / vis.output.scale
    vis.draw_text(text, (w * 0.5, 4), color=color, horizontal_alignment="center")


def _draw_instances(vis: Visualizer, instances, labels, colors, alpha: float) -> None:
    masks = instances.pred_masks.cpu().numpy() if instances.has("pred_masks") else None
    if masks is None or len(masks) == 0:
        return
    vis.overlay_instances(masks=list(masks), labels=labels, assigned_colors=list(colors), alpha=alpha)


def _scores(instances) -> list:
    return instances.scores.detach().float().cpu().tolist() if instances.has("scores") else [None] * len(instances)


def draw_prediction(
    image: np.ndarray,
    prediction: Mapping,
    task: str,
    *,
    class_names: Optional[Sequence[str]] = None,
    regions: Optional[Sequence[RegionPrompt]] = None,
    sentence: Optional[str] = None,
    alpha: float = 0.5,
    scale: float = 1.0,
) -> np.ndarray:
    """Draw one image's prediction.

    Args:
        image: uint8 RGB [H, W, 3], the original image the prediction refers to.
        prediction: the model / predictor output dict for this image.
        task: the task that produced it (``psalm.modeling.tasks``).
        class_names: K names (category tasks).
        regions: the visual prompts (interactive), as parsed by
            :func:`psalm.utils.prompts.parse_visual_prompts`; drawn on top of their masks.
        sentence: the referring expression (referring / gres label).
        alpha: mask opacity. scale: output scale.
    Returns:
        uint8 RGB [round(H * scale), round(W * scale), 3].
    Raises:
        ValueError: the prediction lacks the output of ``task``, or the image is not RGB uint8.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("draw_prediction needs the original image as uint8 RGB [H, W, 3]")
    vis = Visualizer(image, metadata=_metadata(class_names), scale=scale, instance_mode=ColorMode.IMAGE)

    def need(key):
        if key not in prediction:
            raise ValueError(f"a {task!r} prediction must contain {key!r}; got keys {sorted(prediction)}")
        return prediction[key]

    if task == "panoptic":
        panoptic_seg, segments_info = need("panoptic_seg")
        if segments_info:
            vis.draw_panoptic_seg(panoptic_seg.cpu(), segments_info, alpha=alpha)
        else:
            _draw_banner(vis, "no segment passed the panoptic thresholds")
    elif task == "semantic":
        sem_seg = need("sem_seg")
        vis.draw_sem_seg(sem_seg.argmax(dim=0).cpu(), alpha=alpha)
    elif task == "instance":
        inst = need("instances").to("cpu")
        names = list(class_names or [])
        classes = inst.pred_classes.tolist() if inst.has("pred_classes") else [None] * len(inst)
        labels, colors = [], []
        palette = region_colors(max(len(names), 1))
        for c, s in zip(classes, _scores(inst)):
            name = names[c] if c is not None and c < len(names) else (str(c) if c is not None else "")
            labels.append(f"{name} {s:.0%}" if s is not None else name)
            colors.append(palette[c % len(palette)] if c is not None else palette[0])
        _draw_instances(vis, inst, labels, colors, alpha)
        if len(inst) == 0:
            _draw_banner(vis, "no instance")
    elif task in ("referring", "gres"):
        inst = need("instances").to("cpu")
        prefix = f'"{_shorten(sentence)}" ' if sentence else ""
        labels = [f"{prefix}{s:.0%}" for s in _scores(inst)]
        _draw_instances(vis, inst, labels, region_colors(len(inst)), alpha)
        if prediction.get("no_target", False) or len(inst) == 0:
            _draw_banner(vis, f"{prefix}no target", color="red")
    elif task == "interactive":
        inst = need("instances").to("cpu")
        n = len(inst)
        colors = region_colors(max(n, len(regions or [])))
        kinds = [r.kind for r in regions] if regions else [""] * n
        labels = [f"{i}:{kinds[i] if i < len(kinds) else ''} {s:.0%}" for i, s in enumerate(_scores(inst))]
        _draw_instances(vis, inst, labels, colors[:n], alpha)
        if regions:
            _draw_regions(vis, regions, colors)
    elif task in ("instruction", "caption"):
        _draw_banner(vis, _shorten(str(need("text")), 80))
    else:
        raise ValueError(f"no visualisation for task {task!r}")
    return vis.output.get_image()

