"""A deterministic synthetic multi-task data set: coloured shapes on textured wall/floor scenes.

Nothing is downloaded. ``prepare_synthetic(root)`` writes, once, for each split::

    <root>/<split>/images/000000.png        RGB image (``image_size`` x ``image_size``)
    <root>/<split>/panoptic/000000.png      COCO panoptic PNG (id = R + 256 G + 256^2 B)
    <root>/<split>/semantic/000000.png      uint8 contiguous class ids
    <root>/<split>/panoptic.json            COCO panoptic JSON (what COCOPanopticEvaluator reads)
    <root>/<split>/instances.json           COCO instance JSON (RLE masks), things only
    <root>/<split>/referring.json           COCO-style images/annotations + ``refs`` (one target each)
    <root>/<split>/gres.json                same format; multi-target ("all ...") and no-target refs
    <root>/<split>/interactive.json         COCO instance JSON whose annotations carry ``visual_prompts``
    <root>/<split>/caption.json             LLaVA-format caption samples (stage-1 alignment)
    <root>/<split>/scenes.json              the scene description (object attributes, boxes)
    <root>/manifest.json                    generation parameters; a mismatch regenerates

Every byte is a function of ``SyntheticSpec`` only: each image draws from its own
``numpy`` stream seeded by ``(seed, split, index, purpose)``, JSON is written with sorted keys and
PNGs with fixed compression, so the same spec always gives identical files (tests check this).

Label space (contiguous ids): things ``circle, square, triangle, diamond`` (0-3) and stuff
``wall, floor`` (4-5); COCO dataset ids are contiguous id + 1. Things never overlap, so every
instance mask is the full shape. Referring expressions are generated and checked by
:mod:`psalm.data.synthetic_language`.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile

import cv2
import numpy as np

from psalm.data import synthetic_language as lang
from psalm.data.visual_prompts import encode_rle, generate_visual_prompts

__all__ = [
    "SyntheticSpec",
    "THING_CLASSES",
    "STUFF_CLASSES",
    "CLASS_NAMES",
    "CATEGORIES",
    "SPLITS",
    "default_root",
    "generate_scene",
    "prepare_synthetic",
    "split_dir",
    "save_synthetic_tokenizer",
]

logger = logging.getLogger(__name__)

THING_CLASSES = lang.SHAPES
STUFF_CLASSES = ("wall", "floor")
CLASS_NAMES = THING_CLASSES + STUFF_CLASSES
_COLORS = [(220, 45, 45), (40, 170, 70), (45, 85, 225), (235, 205, 40), (120, 120, 120), (160, 110, 70)]
CATEGORIES = [
    {"id": i + 1, "name": n, "isthing": int(n in THING_CLASSES), "color": list(_COLORS[i]), "supercategory": "shape"
     if n in THING_CLASSES else "scene"}
    for i, n in enumerate(CLASS_NAMES)
]
SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}
_PURPOSE = {"scene": 0, "language": 1, "prompts": 2}
GENERATOR_VERSION = 1
_CAPTION_PROMPT = "<image>\nDescribe the image briefly."


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Everything the generated files depend on."""

    seed: int = 0
    image_size: int = 128
    num_train: int = 400
    num_val: int = 40
    min_objects: int = 2
    max_objects: int = 5
    refs_per_image: int = 2  # referring targets per image (fewer when not describable)

    def num_images(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val}[split]

    def to_json(self) -> dict:
        return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}


def default_root() -> str:
    """``$PSALM_SYNTHETIC_DIR`` or ``./datasets/psalm_synthetic``."""
    return os.environ.get("PSALM_SYNTHETIC_DIR", os.path.join("datasets", "psalm_synthetic"))


def split_dir(root: str, split: str) -> str:
    return os.path.join(root, split)


def _rng(spec: SyntheticSpec, split: str, index: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _SPLIT_CODE[split], index, _PURPOSE[purpose]])


# ----------------------------------------------------------------------------- rendering
def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured scene: a brick wall above a slanted horizon, a tiled floor below.

    Returns:
        image float32 [S, S, 3] (0-255), wall bool [S, S].
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    horizon = rng.uniform(0.35, 0.6) * size + rng.uniform(-0.15, 0.15) * (xs - size / 2)
    wall = ys < horizon
    grey = rng.uniform(120, 185)
    wall_rgb = grey + rng.uniform(-15, 15, size=3)
    brick_h = int(rng.integers(6, 11)) * size / 128
    row = np.floor(ys / brick_h)
    brick_w = 2.2 * brick_h
    col = np.floor((xs + (row % 2) * brick_w / 2) / brick_w)
    mortar = ((ys % brick_h) < 1.0) | (((xs + (row % 2) * brick_w / 2) % brick_w) < 1.0)
    brick_shade = (np.sin(row * 12.9898 + col * 78.233) * 43758.5453) % 1.0  # deterministic per brick
    wall_img = wall_rgb[None, None, :] * (0.8 + 0.25 * ys / size)[..., None]
    wall_img = wall_img + 10.0 * (brick_shade - 0.5)[..., None] - 18.0 * mortar[..., None]

    floor_rgb = np.array([rng.uniform(120, 170), rng.uniform(95, 130), rng.uniform(70, 100)])
    tile = int(rng.integers(10, 18)) * size / 128
    checker = ((np.floor(xs / tile) + np.floor(ys / tile)) % 2)[..., None]
    floor_img = floor_rgb[None, None, :] * (0.85 + 0.2 * ys / size)[..., None] + 12.0 * (checker - 0.5)
    image = np.where(wall[..., None], wall_img, floor_img)
    image = image + rng.normal(0.0, 3.0, size=image.shape)
    return image.astype(np.float32), wall


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """bool [S, S] mask of one shape with half-extent ``r`` centred at (cx, cy)."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    if shape == "circle":
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(r)), 1, thickness=-1, lineType=cv2.LINE_8)
    else:
        if shape == "square":
            pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        elif shape == "triangle":
            pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        elif shape == "diamond":
            pts = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        else:
            raise ValueError(f"unknown shape {shape!r}; expected one of {THING_CLASSES}")
        poly = np.round(np.array(pts, dtype=np.float64)).astype(np.int32)
        cv2.fillPoly(canvas, [poly], 1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _sample_attributes(rng: np.random.Generator, placed: list[dict]) -> tuple[str, str, str]:
    """Shape, colour, size; often a twin of an earlier object so that position must disambiguate."""
    shape = lang.SHAPES[int(rng.integers(len(lang.SHAPES)))]
    color = tuple(lang.COLORS)[int(rng.integers(len(lang.COLORS)))]
    size = lang.SIZES[int(rng.integers(2))]
    if placed:
        u = rng.uniform()
        other = placed[int(rng.integers(len(placed)))]
        if u < 0.35:  # same shape and colour (size and position tell them apart)
            shape, color = other["shape"], other["color"]
        elif u < 0.55:  # same shape, other colour
            shape = other["shape"]
        elif u < 0.75:  # same colour, other shape
            color = other["color"]
    return shape, color, size


def generate_scene(spec: SyntheticSpec, split: str, index: int) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """Render one scene.

    Returns:
        image uint8 [S, S, 3] RGB; objects (dicts with ``shape``, ``color``, ``size``, ``bbox``
        (x0, y0, x1, y1) inclusive, ``center`` (cx, cy), ``area``, ``mask`` bool [S, S]);
        wall bool [S, S] (the stuff split; floor = not wall).
    """
    rng = _rng(spec, split, index, "scene")
    size = spec.image_size
    image, wall = _background(rng, size)
    target_n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    objects: list[dict] = []
    occupied: list[tuple[float, float, float, float]] = []
    for _ in range(target_n):
        shape, color, size_name = _sample_attributes(rng, objects)
        lo, hi = (0.055, 0.075) if size_name == "small" else (0.12, 0.16)
        r = rng.uniform(lo, hi) * size
        for _attempt in range(100):
            cx, cy = rng.uniform(r + 2, size - r - 3, size=2)
            box = (cx - r - 3, cy - r - 3, cx + r + 3, cy + r + 3)
            if all(box[2] < o[0] or box[0] > o[2] or box[3] < o[1] or box[1] > o[3] for o in occupied):
                break
        else:
            continue  # no free spot: fewer objects in this scene
        mask = _shape_mask(shape, cx, cy, r, size)
        occupied.append(box)
        yy, xx = np.nonzero(mask)
        objects.append(
            {
                "shape": shape,
                "color": color,
                "size": size_name,
                "bbox": [int(xx.min()), int(yy.min()), int(xx.max()), int(yy.max())],
                "center": [round(float(xx.mean()), 3), round(float(yy.mean()), 3)],
                "area": int(mask.sum()),
                "mask": mask,
            }
        )
        rgb = np.array(lang.COLORS[color], dtype=np.float32) + rng.uniform(-12, 12)
        image[mask] = rgb[None, :] + rng.normal(0.0, 4.0, size=(int(mask.sum()), 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects, wall


# ----------------------------------------------------------------------------- annotations
def _segments(objects: list[dict], wall: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Panoptic id map int64 [S, S] and COCO ``segments_info`` (dataset category ids)."""
    pan = np.zeros(wall.shape, dtype=np.int64)
    things = np.zeros(wall.shape, dtype=bool)
    infos = []
    for i, obj in enumerate(objects):
        pan[obj["mask"]] = i + 1
        things |= obj["mask"]
    regions = [(obj["mask"], THING_CLASSES.index(obj["shape"])) for obj in objects]
    regions += [(wall & ~things, CLASS_NAMES.index("wall")), (~wall & ~things, CLASS_NAMES.index("floor"))]
    for seg_id, (mask, cls) in enumerate(regions, start=1):
        if not mask.any():
            continue
        pan[mask] = seg_id
        yy, xx = np.nonzero(mask)
        infos.append(
            {
                "id": seg_id,
                "category_id": cls + 1,
                "iscrowd": 0,
                "area": int(mask.sum()),
                "bbox": [int(xx.min()), int(yy.min()), int(xx.max() - xx.min() + 1), int(yy.max() - yy.min() + 1)],
            }
        )
    return pan, infos


def _instance_annotation(obj: dict, ann_id: int, image_id: int) -> dict:
    x0, y0, x1, y1 = obj["bbox"]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": THING_CLASSES.index(obj["shape"]) + 1,
        "segmentation": encode_rle(obj["mask"]),
        "area": obj["area"],
        "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
        "iscrowd": 0,
    }


def _refs(spec: SyntheticSpec, split: str, index: int, objects: list[dict], ann_ids: list[int]):
    """(referring refs, gres refs) of one image; ``ref_id`` is filled in by the caller."""
    rng = _rng(spec, split, index, "language")
    size = spec.image_size
    referring, gres = [], []

    def entry(exprs, targets):
        return {
            "image_id": index,
            "ann_ids": [ann_ids[t] for t in targets],
            "sentences": [lang.render(e) for e in exprs],
            "expressions": [e.to_json() for e in exprs],
        }

    for target in rng.permutation(len(objects)).tolist():
        if len(referring) == spec.refs_per_image:
            break
        minimal = lang.minimal_expressions(objects, target, size)
        if not minimal:
            continue
        first = minimal[int(rng.integers(len(minimal)))]
        # a second, richer sentence (as annotators often over-specify): attributes AND position
        rich = [e for e in lang.unique_expressions(objects, target, size)
                if e != first and e.target.num_attributes + (e.kind != "simple") >= 3]
        others = rich or [e for e in minimal if e != first]
        sentences = [first] + ([others[int(rng.integers(len(others)))]] if others else [])
        referring.append(entry(sentences, [target]))
    if referring:  # one single-target expression in gres as well
        gres.append(dict(referring[0], sentences=referring[0]["sentences"][:1],
                         expressions=referring[0]["expressions"][:1]))
    plural = lang.plural_expressions(objects)
    if plural:
        expr = plural[int(rng.integers(len(plural)))]
        gres.append(entry([expr], lang.evaluate(expr, objects, size)))
    none = lang.no_target_expressions(objects)
    if none:
        gres.append(entry([none[int(rng.integers(len(none)))]], []))
    return referring, gres


# ----------------------------------------------------------------------------- writing
def _write_png(path: str, array: np.ndarray) -> None:
    """Write a PNG with fixed settings (deterministic bytes); RGB arrays are given in RGB order."""
    if array.ndim == 3:
        array = array[:, :, ::-1]  # cv2 writes BGR
    if not cv2.imwrite(path, np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 6]):
        raise OSError(f"could not write {path!r}")


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True, separators=(",", ":"))


def _generate_split(spec: SyntheticSpec, split: str, out: str) -> None:
    for sub in ("images", "panoptic", "semantic"):
        os.makedirs(os.path.join(out, sub))
    images, pan_anns, instances, scenes = [], [], [], []
    ref_images, referring, gres, interactive, captions = [], [], [], [], []
    ann_id = 0
    for index in range(spec.num_images(split)):
        image, objects, wall = generate_scene(spec, split, index)
        name = f"{index:06d}.png"
        _write_png(os.path.join(out, "images", name), image)
        pan, infos = _segments(objects, wall)
        rgb = np.stack([pan % 256, pan // 256 % 256, pan // 65536], axis=-1).astype(np.uint8)
        _write_png(os.path.join(out, "panoptic", name), rgb)
        sem = np.zeros(wall.shape, dtype=np.uint8)
        for info in infos:
            sem[pan == info["id"]] = info["category_id"] - 1
        _write_png(os.path.join(out, "semantic", name), sem)

        img = {"id": index, "file_name": name, "height": spec.image_size, "width": spec.image_size}
        images.append(img)
        pan_anns.append({"image_id": index, "file_name": name, "segments_info": infos})
        ids = list(range(ann_id + 1, ann_id + 1 + len(objects)))
        ann_id += len(objects)
        anns = [_instance_annotation(o, i, index) for o, i in zip(objects, ids)]
        instances += anns
        scenes.append({"image_id": index, "file_name": name, "objects": [
            {k: v for k, v in o.items() if k != "mask"} | {"ann_id": i} for o, i in zip(objects, ids)]})

        refs, grefs = _refs(spec, split, index, objects, ids)
        referring += refs
        gres += grefs
        prompt_rng = _rng(spec, split, index, "prompts")
        interactive += [dict(a, visual_prompts=generate_visual_prompts(o["mask"], prompt_rng))
                        for a, o in zip(anns, objects)]
        captions.append({"id": index, "image": f"images/{name}", "height": spec.image_size,
                         "width": spec.image_size, "conversations": [
                             {"from": "human", "value": _CAPTION_PROMPT},
                             {"from": "gpt", "value": lang.caption(objects)}]})

    thing_cats = [c for c in CATEGORIES if c["isthing"]]
    _write_json(os.path.join(out, "panoptic.json"),
                {"images": images, "annotations": pan_anns, "categories": CATEGORIES})
    _write_json(os.path.join(out, "instances.json"),
                {"images": images, "annotations": instances, "categories": thing_cats})
    for name, refs in (("referring", referring), ("gres", gres)):
        for ref_id, ref in enumerate(refs):
            ref["ref_id"] = ref_id
            ref["sentences"] = [{"sent_id": ref_id * 10 + k, "sent": s} for k, s in enumerate(ref["sentences"])]
        _write_json(os.path.join(out, f"{name}.json"),
                    {"images": images, "annotations": instances, "categories": thing_cats, "refs": refs})
    _write_json(os.path.join(out, "interactive.json"), {"images": images, "categories": thing_cats,
                                                        "annotations": interactive})
    _write_json(os.path.join(out, "caption.json"), {"samples": captions})
    _write_json(os.path.join(out, "scenes.json"), {"image_size": spec.image_size, "scenes": scenes})


def _manifest_matches(root: str, spec: SyntheticSpec) -> bool:
    path = os.path.join(root, "manifest.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f) == spec.to_json()
        except json.JSONDecodeError:
            return False


def prepare_synthetic(root: str | None = None, spec: SyntheticSpec = SyntheticSpec(), tokenizer: bool = True) -> str:
    """Write the data set under ``root`` (default :func:`default_root`) unless it is already there.

    Safe to call from several processes at once (a file lock serialises them); a root generated
    with another spec is regenerated. Each split is written to a temporary folder and moved into
    place, so an interrupted run never leaves a half-written split behind.

    Returns:
        the root folder.
    """
    root = os.path.abspath(root or default_root())
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _manifest_matches(root, spec) or not all(
                os.path.isfile(os.path.join(root, s, "scenes.json")) for s in SPLITS
            ):
                manifest = os.path.join(root, "manifest.json")
                if os.path.exists(manifest):
                    os.remove(manifest)
                for split in SPLITS:
                    logger.info("Generating synthetic split %r (%d images) in %s", split, spec.num_images(split), root)
                    tmp = tempfile.mkdtemp(prefix=f".{split}-", dir=root)
                    try:
                        _generate_split(spec, split, tmp)
                        final = split_dir(root, split)
                        if os.path.isdir(final):
                            shutil.rmtree(final)
                        os.replace(tmp, final)
                    finally:
                        if os.path.isdir(tmp):
                            shutil.rmtree(tmp)
                _write_json(manifest, spec.to_json())
            if tokenizer:
                _prepare_tokenizer(root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def synthetic_corpus() -> str:
    """Text the synthetic tokenizer learns its merges from: PSALM's prompt wording plus every word
    the synthetic data uses (class names, attributes, relations, caption wording)."""
    from psalm.modeling.tokenizer import DEFAULT_CORPUS

    words = list(CLASS_NAMES) + list(lang.COLORS) + list(lang.SIZES) + list(lang.RELATIONS) + list(lang.DIRECTIONS)
    lines = [" ".join(words), " ".join(f"all {w}s" for w in THING_CLASSES), _CAPTION_PROMPT,
             "in front of a wall, standing on a tiled floor.", "the small red triangle left of the circle."]
    return DEFAULT_CORPUS + "\n".join(lines * 3) + "\n"


SYNTHETIC_TOKENIZER_MERGES = 300


def save_synthetic_tokenizer(directory: str) -> str:
    """Write the tiny tokenizer of the synthetic data set (deterministic) to ``directory``.

    Its vocabulary has ``256 + SYNTHETIC_TOKENIZER_MERGES + 3`` entries at most (fewer if the corpus
    runs out of merges); ``MODEL.PSALM.LLM.VOCAB_SIZE`` must be at least that.
    """
    from psalm.modeling.tokenizer import save_tiny_tokenizer

    return str(save_tiny_tokenizer(directory, num_merges=SYNTHETIC_TOKENIZER_MERGES, corpus=synthetic_corpus()))


def _prepare_tokenizer(root: str) -> str:
    path = os.path.join(root, "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=root)
        try:
            save_synthetic_tokenizer(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
    return path
