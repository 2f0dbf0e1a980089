"""``PSALMDatasetMapper``: one dataset dict -> one model input dict (docs/DESIGN.md), for every task.

Used by training, evaluation and (through :func:`preprocess_image`) the predictor. The geometry is
the official one (spec 3.7): resize the long side to ``INPUT.IMAGE_SIZE`` (detectron2
``ResizeShortestEdge(S, max_size=S)`` rounding, PIL bilinear), pad right/bottom to S x S with
``INPUT.PAD_VALUE``; no flip, no scale jitter. Ground-truth and prompt masks are resized with
nearest neighbour (PIL convention: output pixel i reads input pixel ``floor((i + 0.5) * in / out)``)
and padded with False; polygons are scaled and rasterised at the resized size.

GT sources per task (training only; evaluation reads its GT in the evaluators):

* ``panoptic``: ``pan_seg_file_name`` PNG -> ``rgb2id`` -> one mask per non-crowd segment of
  ``segments_info`` (contiguous ``category_id``).
* ``instance`` / ``referring`` / ``gres``: ``annotations[*].segmentation`` (polygons or RLE);
  crowd annotations are dropped for ``instance``.
* ``semantic``: ``sem_seg_file_name`` PNG -> one mask per class present (``ignore_label`` excluded).
* ``interactive``: ``annotations`` with ``visual_prompts`` (training: a type drawn uniformly per
  annotation among its non-empty types in ``INPUT.INTERACTIVE_PROMPT_TYPES``; evaluation: the
  data set's metadata ``prompt_type``, e.g. ``box`` for ``coco_interactive_val_box``; a data set
  without one (``"any"``) is evaluated only if each annotation has a single prompt type). Annotations without a usable prompt are dropped from the
  prompts AND the GT, so region j always belongs to GT j; ``region_ann_indices`` says which
  annotations were kept. Prompts are rasterised (points / scribbles dilated) at the original size.

Category tasks get ``class_names`` (metadata ``prompt_class_names``) and ``is_thing`` (metadata
``prompt_is_thing``, K bools; required for panoptic evaluation).

The prompt is built here, in the data path (the loader's workers), not in the model's forward: with a
``prompt_builder`` (from_config: whenever the config names a tokenizer) every output holds ``"prompt"``,
the sample's :class:`~psalm.data.prompt.TokenizedPrompt` from :func:`~psalm.data.prompt.prompt_for_input`
(training: the class order drawn from the sample's ``rng``). A segmentation prompt longer than the
context after splicing is an error here, naming the data set and the sample. One exception: at
evaluation a class list over the context gets no ``"prompt"`` (the model predicts it in class chunks,
``psalm.inference.class_chunks``, each chunk with its own prompt).

Every dataset-dict field other than ``annotations`` / ``segments_info`` / ``conversations`` is
passed through unchanged (``image_id``, ``sample_id``, ``ref_id``, ``no_target``, DAVIS fields...).
"""
import copy
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances, polygons_to_bitmask

from psalm.structures.tasks import CATEGORY_TASKS, LM_TASKS, SENTENCE_TASKS, check_task

from .prompt import build_prompt_builder, prompt_for_input
from .visual_prompts import PROMPT_TYPES, decode_rle, rasterize_prompt, rle_area, valid_polygons

__all__ = ["PSALMDatasetMapper", "preprocess_image", "read_label_map", "resized_shape", "resize_pad_masks"]

logger = logging.getLogger(__name__)

# dataset-dict fields turned into model inputs (not passed through as they are)
_CONSUMED_KEYS = ("annotations", "segments_info", "conversations")


# ----------------------------------------------------------------------------- geometry
def resized_shape(height: int, width: int, image_size: int) -> Tuple[int, int]:
    """(new_h, new_w) with the long side resized to ``image_size`` (detectron2 rounding)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return T.ResizeShortestEdge.get_output_shape(height, width, image_size, image_size)


def preprocess_image(
    image: np.ndarray, image_size: int, pad_value: float = 128.0
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """Resize the long side of an RGB image to ``image_size`` and pad it to a square.

    Args:
        image: uint8 [H, W, 3] RGB.
        image_size: S, the padded side.
        pad_value: value of the padded pixels (official 128).

    Returns:
        (image uint8 [3, S, S], padding_mask bool [S, S] (True = padding), (new_h, new_w) the
        size of the valid, un-padded region).
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected an RGB image array [H, W, 3], got {type(image).__name__} of shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (0..255), got dtype {image.dtype}; convert it first")
    height, width = image.shape[:2]
    new_h, new_w = resized_shape(height, width, image_size)
    if (new_h, new_w) != (height, width):
        image = T.ResizeTransform(height, width, new_h, new_w, Image.BILINEAR).apply_image(image)
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be a uint8 pixel value in [0, 255], got {pad_value}")
    out = torch.full((3, image_size, image_size), int(round(pad_value)), dtype=torch.uint8)
    out[:, :new_h, :new_w] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    padding_mask = torch.ones(image_size, image_size, dtype=torch.bool)
    padding_mask[:new_h, :new_w] = False
    return out, padding_mask, (new_h, new_w)


def read_label_map(path) -> np.ndarray:
    """Read a semantic label PNG (one class index per pixel).

    The file is decoded by detectron2's ``read_image`` in its own mode (no colour conversion: an ``L``
    or palette ``P`` PNG gives its stored indices); of a multi-channel file (e.g. RGB) the first
    channel is the label.

    Args:
        path: the PNG (str or path-like; any detectron2 ``PathManager`` path).

    Returns:
        int64 numpy array [H, W] of label values (``ignore_label`` included as stored).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a readable image.
    """
    try:
        label = utils.read_image(str(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"semantic label map {str(path)!r} does not exist") from e
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"semantic label map {str(path)!r} is not a readable image: {e}") from e
    label = np.asarray(label).astype(np.int64)
    return label[..., 0] if label.ndim == 3 else label


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    return np.minimum(((np.arange(out_size) + 0.5) * (in_size / out_size)).astype(np.int64), in_size - 1)


def resize_pad_masks(masks: np.ndarray, new_hw: Tuple[int, int], image_size: int) -> torch.Tensor:
    """Nearest-neighbour resize of label maps / masks, then zero-pad to ``image_size``.

    Args:
        masks: [N, h, w] or [h, w] array of any dtype.
        new_hw: (new_h, new_w), the resized size.
    Returns:
        tensor [N, S, S] (or [S, S]) of the input dtype, 0 / False in the padding.
    """
    squeeze = masks.ndim == 2
    if squeeze:
        masks = masks[None]
    new_h, new_w = new_hw
    rows = _nearest_index(masks.shape[1], new_h)
    cols = _nearest_index(masks.shape[2], new_w)
    resized = masks[:, rows[:, None], cols[None, :]]
    out = np.zeros((masks.shape[0], image_size, image_size), dtype=masks.dtype)
    out[:, :new_h, :new_w] = resized
    out = torch.from_numpy(out)
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------- the mapper
class PSALMDatasetMapper:
    """Callable: dataset dict (docs/DESIGN.md, "Dataset dicts") -> model input dict ("Model input").

    The image is read from ``file_name`` (RGB), or taken from ``image`` when that is an RGB uint8
    [H, W, 3] numpy array. ``mapper(dataset_dict, rng=None)``: ``rng`` (``numpy.random.Generator``)
    drives the random choices of training (interactive prompt types); without it numpy's global
    RNG is used. The dataset dict is never modified.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        image_size: int,
        pad_value: float = 128.0,
        image_format: str = "RGB",
        point_radius: int = 10,
        scribble_radius: int = 5,
        train_prompt_types: Sequence[str] = PROMPT_TYPES,
        test_prompt_type: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
        is_thing: Optional[Sequence[bool]] = None,
        ignore_label: int = 255,
        task: Optional[str] = None,
        class_budget=None,
        detections_per_image: Optional[int] = None,
        prompt_builder=None,
        shuffle_classes: bool = False,
        context_length: Optional[int] = None,
        num_image_tokens: int = 0,
        num_mask_tokens: int = 0,
        dataset_name: Optional[str] = None,
    ):
        """
        Args:
            is_train: training (GT instances, random prompt types) or evaluation.
            image_size: S. pad_value: padded pixel value. image_format: must be "RGB".
            point_radius / scribble_radius: disk radii of the prompt dilation.
            train_prompt_types: prompt types interactive training samples draw from.
            test_prompt_type: the prompt type of interactive evaluation; from_config reads the
                metadata's ``prompt_type`` (None or ``"any"``: each annotation must carry one type).
            class_names: K category names of the data set (category tasks); from_config reads
                the metadata's ``prompt_class_names``.
            is_thing: K flags (``class_names`` order) copied into every category-task input as
                ``is_thing``; from_config reads the metadata's ``prompt_is_thing``. Required for
                panoptic evaluation (post-processing merges stuff segments by it).
            ignore_label: ignored value of semantic PNGs.
            task: if set, the task of EVERY dict this mapper maps (overrides the dicts' own
                ``task``, e.g. DATASETS.TRAIN_TASKS); None: each dict's ``task`` field.
            class_budget: a :class:`psalm.data.class_budget.LazyClassBudget`; training images of a
                category data set whose class list exceeds the context get a class subset
                (positives + negatives, :meth:`ClassContextBudget.training_subset`): their
                ``class_names`` / ``is_thing`` are the subset, ``gt_classes`` index it and
                ``class_ids`` holds the subset's ids in the full list. None: never.
            detections_per_image: copied into evaluation inputs (post-processing top-k of this
                data set, e.g. LVIS 300); from_config reads the metadata's ``detections_per_image``.
            prompt_builder: a :class:`~psalm.data.prompt.PromptBuilder`: every output gets its ``"prompt"``
                (module docstring). None: no prompts (the model builds them).
            shuffle_classes: training: category prompts list the classes in a random order drawn from
                the sample's ``rng`` (``MODEL.PSALM.SHUFFLE_CLASSES_TRAIN``, official).
            context_length: the longest spliced sequence (``psalm.data.class_budget.context_length``);
                a longer segmentation prompt is an error. None: unchecked.
            num_image_tokens / num_mask_tokens: N = (S / 64)^2 and Q, for the spliced length.
            dataset_name: names the data set in error messages.
        """
        if image_format != "RGB":
            raise ValueError(f"PSALM reads RGB images (INPUT.FORMAT='RGB'), got {image_format!r}")
        if test_prompt_type == "any":
            test_prompt_type = None
        for t in list(train_prompt_types) + ([test_prompt_type] if test_prompt_type is not None else []):
            if t not in PROMPT_TYPES:
                raise ValueError(f"unknown visual prompt type {t!r}; expected one of {PROMPT_TYPES}")
        self.is_train = is_train
        self.image_size = int(image_size)
        self.pad_value = float(pad_value)
        self.point_radius = int(point_radius)
        self.scribble_radius = int(scribble_radius)
        self.train_prompt_types = tuple(train_prompt_types)
        self.test_prompt_type = test_prompt_type
        self.class_names = list(class_names) if class_names is not None else None
        self.is_thing = self._check_is_thing(is_thing, self.class_names)
        self.ignore_label = int(ignore_label)
        self.task = check_task(task) if task is not None else None
        self.class_budget = class_budget
        self.detections_per_image = detections_per_image
        self.prompt_builder = prompt_builder
        self.shuffle_classes = bool(shuffle_classes)
        self.context_length = None if context_length is None else int(context_length)
        self.num_image_tokens = int(num_image_tokens)
        self.num_mask_tokens = int(num_mask_tokens)
        self.dataset_name = dataset_name
        self._eval_budget = None

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: Optional[str] = None,
                    build_prompts: Optional[bool] = None):
        """``build_prompts``: give the outputs their ``"prompt"``; None: when the config names a tokenizer
        (``MODEL.PSALM.TOKENIZER`` or ``MODEL.PSALM.LLM.NAME_OR_PATH``; without one no model can run)."""
        from .class_budget import context_length, num_image_tokens

        if build_prompts is None:
            build_prompts = bool(cfg.MODEL.PSALM.TOKENIZER or cfg.MODEL.PSALM.LLM.NAME_OR_PATH)
        ret = {
            "is_train": is_train,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "pad_value": cfg.INPUT.PAD_VALUE,
            "image_format": cfg.INPUT.FORMAT,
            "point_radius": cfg.INPUT.POINT_RADIUS,
            "scribble_radius": cfg.INPUT.SCRIBBLE_RADIUS,
            "train_prompt_types": cfg.INPUT.INTERACTIVE_PROMPT_TYPES,
            "dataset_name": dataset_name,
        }
        if build_prompts:
            ret.update(
                prompt_builder=build_prompt_builder(cfg),
                shuffle_classes=cfg.MODEL.PSALM.SHUFFLE_CLASSES_TRAIN,
                context_length=context_length(cfg),
                num_image_tokens=num_image_tokens(cfg.INPUT.IMAGE_SIZE),
                num_mask_tokens=cfg.MODEL.PSALM.NUM_MASK_TOKENS,
            )
        if dataset_name is not None:
            meta = MetadataCatalog.get(dataset_name)
            # NOT meta.class_names: detectron2 aliases that key to thing_classes (docs/DESIGN.md)
            ret["class_names"] = meta.get("prompt_class_names", None)
            ret["is_thing"] = meta.get("prompt_is_thing", None)
            ret["ignore_label"] = meta.get("ignore_label", 255)
            # one source of truth: coco_interactive_val_<type> evaluates <type> prompts
            ret["test_prompt_type"] = meta.get("prompt_type", None)
            ret["detections_per_image"] = meta.get("detections_per_image", None)
            if is_train and ret["class_names"]:
                from .class_budget import LazyClassBudget

                ret["class_budget"] = LazyClassBudget(cfg)
        return ret

    @staticmethod
    def _check_is_thing(is_thing, class_names) -> Optional[List[bool]]:
        if is_thing is None:
            return None
        flags = list(is_thing)
        if class_names is None:
            raise ValueError("is_thing was given without class_names; pass both (metadata prompt_class_names / "
                             "prompt_is_thing)")
        if len(flags) != len(class_names):
            raise ValueError(
                f"is_thing has {len(flags)} entries for {len(class_names)} class names; the metadata's "
                "prompt_is_thing must hold one bool per prompt_class_names entry, in the same order"
            )
        bad = [v for v in flags if not isinstance(v, (bool, np.bool_)) and v not in (0, 1)]
        if bad:
            raise ValueError(f"is_thing must hold booleans, got {bad[:3]}")
        return [bool(v) for v in flags]

    # ------------------------------------------------------------------ entry point
    def __call__(self, dataset_dict: Dict, rng: Optional[np.random.Generator] = None) -> Dict:
        d = copy.deepcopy(dataset_dict)
        task = self.task if self.task is not None else d.get("task")
        if task is None:
            raise ValueError(
                f"dataset dict of {d.get('file_name')!r} has no 'task'; register the data set with one "
                "or build the mapper with task="
            )
        task = check_task(task)

        if isinstance(d.get("image"), np.ndarray):  # an in-memory RGB uint8 [H, W, 3] image
            image = d.pop("image")
        elif "file_name" in d:
            image = utils.read_image(d["file_name"], format="RGB")
        else:
            raise ValueError("dataset dict needs 'file_name' (an image path) or 'image' (RGB uint8 [H, W, 3] array)")
        utils.check_image_size(d, image)
        orig_hw = image.shape[:2]
        image_t, padding_mask, new_hw = preprocess_image(image, self.image_size, self.pad_value)

        # every other field (image_id, sample_id, ref_id, no_target, video_name, ...) passes through
        out = {k: v for k, v in d.items() if k not in _CONSUMED_KEYS}
        out.update(
            image=image_t,
            padding_mask=padding_mask,
            height=d.get("height", orig_hw[0]),
            width=d.get("width", orig_hw[1]),
            task=task,
        )

        if task in CATEGORY_TASKS:
            if self.class_names is None:
                raise ValueError(
                    f"task {task!r} needs class names: set MetadataCatalog.get(name).prompt_class_names "
                    "and build the mapper with dataset_name=name (or pass class_names=)"
                )
            out["class_names"] = list(self.class_names)
            if self.is_thing is not None:
                out["is_thing"] = list(self.is_thing)
            elif task == "panoptic" and not self.is_train:
                raise ValueError(
                    "panoptic evaluation needs is_thing (K bools, class_names order) to merge stuff segments: "
                    "set MetadataCatalog.get(name).prompt_is_thing and build the mapper with dataset_name=name "
                    "(or pass is_thing=)"
                )
        if task in SENTENCE_TASKS:
            sentences = d.get("sentences")
            if not sentences or not all(isinstance(s, str) for s in sentences):
                raise ValueError(f"{task} dict of {d.get('file_name')!r} needs 'sentences': a non-empty list[str]")
            out["sentences"] = list(sentences)
        if task in LM_TASKS:
            if "conversations" not in d:
                raise ValueError(f"{task} dict of {d.get('file_name')!r} needs 'conversations' (LLaVA format)")
            out["conversation"] = d["conversations"]

        masks, classes = None, None
        if task == "interactive":
            region_masks, masks, classes, kept = self._interactive(d, orig_hw, new_hw, rng)
            out["region_masks"] = region_masks
            out["region_ann_indices"] = kept
        elif self.is_train and task not in LM_TASKS:
            masks, classes = self._gt_masks(task, d, orig_hw, new_hw)
        if (self.is_train and masks is not None and task in CATEGORY_TASKS and self.class_budget is not None
                and self.class_budget.may_overflow(out["class_names"])):
            masks, classes = self._class_subset(out, masks, classes, rng)
        if not self.is_train and self.detections_per_image is not None and task in CATEGORY_TASKS:
            out["detections_per_image"] = int(self.detections_per_image)
        if self.is_train and masks is not None:
            instances = Instances((self.image_size, self.image_size))
            instances.gt_masks = masks
            instances.gt_classes = classes
            out["instances"] = instances
        if self.prompt_builder is not None:
            self._attach_prompt(out, d, rng)
        return out

    def _where(self, d: Dict) -> str:
        sample = d.get("image_id", d.get("sample_id"))
        name = f"sample {sample!r} ({d.get('file_name', 'in-memory image')})" if sample is not None else (
            f"sample {d.get('file_name', 'in-memory image')!r}")
        return f"data set {self.dataset_name!r}, {name}" if self.dataset_name else name

    def _attach_prompt(self, out: Dict, d: Dict, rng) -> None:
        """``out["prompt"]``: the sample's TokenizedPrompt (module docstring); length errors name the sample."""
        from .class_budget import ClassContextBudget

        task = out["task"]
        if task in CATEGORY_TASKS and not self.is_train and self.context_length is not None:
            if self._eval_budget is None:
                self._eval_budget = ClassContextBudget(
                    self.prompt_builder, self.context_length, self.num_image_tokens, self.num_mask_tokens
                )
            if not self._eval_budget.fits(out["class_names"]):
                return  # the model predicts it in class chunks, each with its own prompt
        where = self._where(d)
        try:
            prompt = prompt_for_input(
                self.prompt_builder, out, shuffle_classes=self.is_train and self.shuffle_classes, rng=rng,
                generation=not self.is_train, where="the mapped input",
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if self.context_length is not None and task not in LM_TASKS:
            n = self.prompt_builder.spliced_length(prompt, self.num_image_tokens, self.num_mask_tokens)
            if n > self.context_length:
                raise ValueError(
                    f"{where}: its {task} prompt is {n} tokens long after splicing ({self.num_image_tokens} image "
                    f"tokens, {self.num_mask_tokens} mask tokens), more than the context {self.context_length} "
                    "(the smaller of MODEL.PSALM.MODEL_MAX_LENGTH and MODEL.PSALM.LLM.MAX_POSITION_EMBEDDINGS): "
                    "shorten the sample's text or raise those limits"
                )
        out["prompt"] = prompt

    def _class_subset(self, out: Dict, masks: torch.Tensor, classes: torch.Tensor, rng):
        """A class list over the context: this image's classes + random negatives that fit (in place on out)."""
        names = out["class_names"]
        budget = self.class_budget.get()
        if budget.fits(names):
            return masks, classes
        keep = budget.training_subset(names, classes.tolist(), rng)
        index = {k: i for i, k in enumerate(keep)}
        sel = [i for i, c in enumerate(classes.tolist()) if int(c) in index]
        out["class_names"] = [names[k] for k in keep]
        if "is_thing" in out:
            out["is_thing"] = [out["is_thing"][k] for k in keep]
        out["class_ids"] = list(keep)
        new_classes = torch.tensor([index[int(classes[i])] for i in sel], dtype=torch.int64)
        return masks[sel], new_classes

    # ------------------------------------------------------------------ GT
    def _empty_masks(self) -> torch.Tensor:
        return torch.zeros((0, self.image_size, self.image_size), dtype=torch.bool)

    def _annotation_mask(self, ann: Dict, orig_hw, new_hw) -> torch.Tensor:
        """bool [S, S] mask of one annotation (polygons scaled then rasterised; RLE resized)."""
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            seg = valid_polygons(seg)  # the loaders already drop these; hand-made dicts may not
            if not seg:
                raise ValueError(
                    f"annotation {ann.get('id')} has no valid polygon (need >= 3 points, an even number of "
                    "coordinates); psalm's loaders drop such annotations (detectron2's rule)"
                )
            sy, sx = new_hw[0] / orig_hw[0], new_hw[1] / orig_hw[1]
            polygons = []
            for poly in seg:
                p = np.asarray(poly, dtype=np.float64).reshape(-1, 2) * np.array([sx, sy])
                polygons.append(p.reshape(-1))
            mask = polygons_to_bitmask(polygons, new_hw[0], new_hw[1])
            out = np.zeros((self.image_size, self.image_size), dtype=bool)
            out[: new_hw[0], : new_hw[1]] = mask
            return torch.from_numpy(out)
        if isinstance(seg, dict):
            mask = decode_rle(seg)
            if mask.shape != tuple(orig_hw):
                raise ValueError(f"RLE of annotation {ann.get('id')} is {mask.shape}, the image is {tuple(orig_hw)}")
            return resize_pad_masks(mask, new_hw, self.image_size)
        raise ValueError(
            f"annotation {ann.get('id')}: 'segmentation' must be polygons (list) or a COCO RLE (dict), "
            f"got {type(seg).__name__}"
        )

    def _gt_masks(self, task: str, d: Dict, orig_hw, new_hw) -> Tuple[torch.Tensor, torch.Tensor]:
        if task == "panoptic":
            from panopticapi.utils import rgb2id

            if "pan_seg_file_name" not in d or "segments_info" not in d:
                raise ValueError(f"panoptic dict of {d.get('file_name')!r} needs 'pan_seg_file_name' and 'segments_info'")
            ids = rgb2id(utils.read_image(d["pan_seg_file_name"], "RGB").astype(np.int64))
            if ids.shape != tuple(orig_hw):
                raise ValueError(f"panoptic PNG {d['pan_seg_file_name']!r} is {ids.shape}, the image {tuple(orig_hw)}")
            ids = resize_pad_masks(ids, new_hw, self.image_size).numpy()
            segs = [s for s in d["segments_info"] if not s.get("iscrowd", 0)]
            if not segs:
                return self._empty_masks(), torch.zeros(0, dtype=torch.int64)
            masks = np.stack([ids == s["id"] for s in segs])
            classes = [s["category_id"] for s in segs]
            return torch.from_numpy(masks), torch.tensor(classes, dtype=torch.int64)
        if task == "semantic":
            if "sem_seg_file_name" not in d:
                raise ValueError(f"semantic dict of {d.get('file_name')!r} needs 'sem_seg_file_name'")
            sem = read_label_map(d["sem_seg_file_name"])
            if sem.shape != tuple(orig_hw):
                raise ValueError(f"semantic PNG {d['sem_seg_file_name']!r} is {sem.shape}, the image {tuple(orig_hw)}")
            # padding gets the ignore label, so that it belongs to no class
            sem = resize_pad_masks(sem - self.ignore_label, new_hw, self.image_size).numpy() + self.ignore_label
            classes = [int(c) for c in np.unique(sem) if c != self.ignore_label]
            if not classes:
                return self._empty_masks(), torch.zeros(0, dtype=torch.int64)
            masks = np.stack([sem == c for c in classes])
            return torch.from_numpy(masks), torch.tensor(classes, dtype=torch.int64)
        # instance / referring / gres
        anns = d.get("annotations", [])
        if task == "instance":
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        if not anns:
            return self._empty_masks(), torch.zeros(0, dtype=torch.int64)
        masks = torch.stack([self._annotation_mask(a, orig_hw, new_hw) for a in anns])
        classes = torch.tensor([int(a.get("category_id", 0)) for a in anns], dtype=torch.int64)
        return masks, classes

    # ------------------------------------------------------------------ interactive
    def _choose(self, options: List[str], rng: Optional[np.random.Generator]) -> str:
        i = int(rng.integers(len(options))) if rng is not None else int(np.random.randint(len(options)))
        return options[i]

    def _interactive(self, d: Dict, orig_hw, new_hw, rng):
        region_masks, gt_masks, classes, kept = [], [], [], []
        for i, ann in enumerate(d.get("annotations", [])):
            prompts = ann.get("visual_prompts") or {}
            unknown = set(prompts) - set(PROMPT_TYPES)
            if unknown:
                raise ValueError(f"annotation {ann.get('id')}: unknown visual prompt types {sorted(unknown)}")
            if self.is_train:
                allowed = self.train_prompt_types
            elif self.test_prompt_type is not None:
                allowed = (self.test_prompt_type,)
            else:
                present = [t for t in PROMPT_TYPES if t in prompts and rle_area(prompts[t]) > 0]
                if len(present) > 1:
                    raise ValueError(
                        f"interactive evaluation of {d.get('file_name')!r}: annotation {ann.get('id')} has the "
                        f"prompt types {present} and the data set names none (metadata prompt_type); evaluate a "
                        "single-type data set (e.g. coco_interactive_val_point / _scribble / _box / _mask) or build "
                        "the mapper with test_prompt_type="
                    )
                allowed = tuple(present)
            usable = [t for t in allowed if t in prompts and rle_area(prompts[t]) > 0]
            if not usable:
                continue
            chosen = self._choose(usable, rng) if self.is_train else usable[0]
            mask = rasterize_prompt(chosen, prompts[chosen], self.point_radius, self.scribble_radius)
            if mask.shape != tuple(orig_hw):
                raise ValueError(f"{chosen} prompt of annotation {ann.get('id')} is {mask.shape}, the image {tuple(orig_hw)}")
            region_masks.append(resize_pad_masks(mask, new_hw, self.image_size))
            if self.is_train:
                gt_masks.append(self._annotation_mask(ann, orig_hw, new_hw))
                classes.append(int(ann.get("category_id", 0)))
            kept.append(i)
        regions = torch.stack(region_masks) if region_masks else self._empty_masks()
        if not self.is_train:
            return regions, None, None, kept
        masks = torch.stack(gt_masks) if gt_masks else self._empty_masks()
        return regions, masks, torch.tensor(classes, dtype=torch.int64), kept
