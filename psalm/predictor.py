"""``PSALMPredictor``: one call from a user image and a prompt to detectron2-standard outputs.

In the style of detectron2's ``DefaultPredictor``: it builds the model from a config, loads
``MODEL.WEIGHTS`` with a ``DetectionCheckpointer`` (the project's subclass
:class:`~psalm.engine.checkpoint.PSALMCheckpointer`; missing or mis-shaped keys are an error; an
empty ``MODEL.WEIGHTS`` keeps the random initialisation with a warning), puts it in eval mode on
``MODEL.DEVICE`` and runs inference with the precision ``TEST.PSALM.DTYPE`` ("auto": bf16
autocast on CUDA, fp32 on CPU).
Images go through the ONE preprocessing pipeline (:func:`psalm.data.mapper.preprocess_image`);
visual prompts through the data set rasteriser (:mod:`psalm.utils.prompts`).

Outputs are the model's result dicts with tensors on ``MODEL.DEVICE`` (as detectron2's predictor).

Usage::

    predictor = PSALMPredictor(cfg)
    predictor = PSALMPredictor.from_pretrained("output/tiny_synthetic")   # a model directory
    out = predictor("img.jpg", task="panoptic", classes=["person", "dog", "grass"])
    out = predictor(img, task="referring", text="the dog on the left")
    out = predictor(img, task="interactive", points=[(120, 80)], boxes=[(10, 10, 200, 150)])
    out = predictor(img, task="instruction", question="What is in the image?")   # out["text"]
    outs = predictor.predict_batch([img1, img2], task="instance", classes=["cat"])   # one forward
    outs = predictor.predict_prompts(img, [{"task": "referring", "text": "a cup"},
                                           {"task": "interactive", "points": [(5, 5)]}])  # encoded once

Prompt keywords per task (anything else is an error):

=================================  ==========================================================
task                               keywords
=================================  ==========================================================
panoptic / instance / semantic     ``classes`` (list of K names; open vocabulary: any names),
                                   optional ``is_thing`` (K bools, panoptic; default all True)
referring / gres                   ``text`` (a sentence, or a list merged as the official code)
interactive                        ``points``, ``scribbles``, ``boxes``, ``masks``
                                   (:mod:`psalm.utils.prompts`)
instruction                        ``question``
=================================  ==========================================================

Errors: every bad input raises :class:`ValueError` (``FileNotFoundError`` for a missing image
file) with a message saying what is wrong and how to fix it. Images are converted to 8-bit RGB
(:mod:`psalm.utils.image_io`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch

from psalm.data.mapper import preprocess_image, resize_pad_masks
from psalm.modeling.tasks import CATEGORY_TASKS, SENTENCE_TASKS, check_task
from psalm.utils.image_io import ImageLike, load_image
from psalm.utils.prompts import parse_visual_prompts, rasterize_regions

__all__ = [
    "PSALMPredictor",
    "INFERENCE_DTYPES",
    "resolve_device",
    "resolve_inference_dtype",
    "autocast_context",
    "ensure_tokenizer",
]

logger = logging.getLogger(__name__)

INFERENCE_DTYPES = ("auto", "fp32", "bf16", "fp16")
_TASK_KEYWORDS = {
    **{t: ("classes", "is_thing") for t in CATEGORY_TASKS},
    **{t: ("text",) for t in SENTENCE_TASKS},
    "interactive": ("points", "scribbles", "boxes", "masks"),
    "instruction": ("question",),
}
# the real phi-1_5 vocabulary is 50297; anything below the GPT-2 BPE size is a test model
_SMALLEST_REAL_VOCAB = 50257


# ------------------------------------------------------------------------------------ device / dtype
def resolve_device(device: str) -> torch.device:
    """``MODEL.DEVICE`` -> ``torch.device``; a CUDA device without CUDA is an error, not a silent CPU run."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"MODEL.DEVICE={device!r} is not a valid torch device (use 'cpu' or 'cuda[:N]')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE={device!r} but CUDA is not available on this machine; set MODEL.DEVICE cpu "
            "(e.g. --opts MODEL.DEVICE cpu)"
        )
    return dev


def resolve_inference_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """``TEST.PSALM.DTYPE`` -> the autocast dtype, or None for plain fp32.

    "auto": bf16 on CUDA (fp16 when the GPU has no bf16), fp32 on CPU. "fp16" needs CUDA.
    """
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"TEST.PSALM.DTYPE={name!r}; expected one of {INFERENCE_DTYPES}")
    if name == "fp32":
        return None
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise ValueError("TEST.PSALM.DTYPE='fp16' needs a CUDA device; use 'fp32' or 'bf16' on CPU")
    return torch.bfloat16 if name == "bf16" else torch.float16


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------ tokenizer
def ensure_tokenizer(cfg, cache_dir: Optional[str] = None):
    """Make sure ``MODEL.PSALM.TOKENIZER`` points at a tokenizer; returns the (possibly updated) cfg.

    For a test-size LLM (``MODEL.PSALM.LLM.VOCAB_SIZE`` below the GPT-2 vocabulary) with no
    tokenizer configured, the tiny byte-level tokenizer of :mod:`psalm.data.tokenizer` is built
    once into ``cache_dir`` (or ``$PSALM_CACHE``) with exactly ``VOCAB_SIZE`` entries, and a warning
    is logged. The test tokenizer is written only where the caller asks for it: with neither
    ``cache_dir`` nor ``$PSALM_CACHE`` it is an error (nothing is written to the home directory). A
    full-size config without a tokenizer is an error (nothing is downloaded). ``cfg`` is cloned,
    never modified in place.
    """
    if cfg.MODEL.PSALM.TOKENIZER or cfg.MODEL.PSALM.LLM.NAME_OR_PATH:
        return cfg
    vocab = int(cfg.MODEL.PSALM.LLM.VOCAB_SIZE)
    if vocab >= _SMALLEST_REAL_VOCAB:
        raise ValueError(
            "MODEL.PSALM.TOKENIZER is empty; set it to the local phi-1_5 tokenizer directory "
            "(see MODEL_ZOO.md), e.g. --opts MODEL.PSALM.TOKENIZER checkpoints/phi-1_5"
        )
    from psalm.data.tokenizer import build_tiny_tokenizer, save_tiny_tokenizer

    if not (cache_dir or os.environ.get("PSALM_CACHE")):
        raise ValueError(
            "MODEL.PSALM.TOKENIZER is empty: set it to a tokenizer directory, or ask for the tiny test tokenizer "
            "of this test-size model by naming where to write it: PSALM_CACHE=DIR in the environment (demo, "
            "benchmark) or ensure_tokenizer(cfg, cache_dir=DIR)"
        )
    base = pathlib.Path(cache_dir or os.environ["PSALM_CACHE"])
    num_merges = vocab - 259  # 256 bytes + merges + <|endoftext|>, [PAD], [SEG]
    if num_merges < 0:
        raise ValueError(f"MODEL.PSALM.LLM.VOCAB_SIZE={vocab} is too small for a byte-level tokenizer (>= 259)")
    path = base / f"tiny_tokenizer_{vocab}"
    if not (path / "tokenizer.json").is_file():
        tmp = base / f".tiny_tokenizer_{vocab}.{os.getpid()}"
        tok = build_tiny_tokenizer(num_merges=num_merges, model_max_length=cfg.MODEL.PSALM.MODEL_MAX_LENGTH)
        if len(tok) > vocab:
            raise ValueError(f"the tiny tokenizer has {len(tok)} tokens, more than VOCAB_SIZE={vocab}")
        tmp.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, path)  # atomic: concurrent processes never see a half-written directory
        except OSError:
            save_tiny_tokenizer(path, num_merges=num_merges)  # another process won the race; ours is identical
    logger.warning(
        "MODEL.PSALM.TOKENIZER is empty: using the tiny test tokenizer in %s (a test model; its outputs are "
        "meaningless). Set MODEL.PSALM.TOKENIZER for a real model.", path,
    )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.PSALM.TOKENIZER = str(path)
    return cfg


# ------------------------------------------------------------------------------------ inputs
def _clean_strings(values, what: str) -> List[str]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{what} must be a non-empty list of strings, got {values!r:.80}")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{what}[{i}] = {v!r:.40} is empty or not a string; give non-empty text")
        out.append(" ".join(v.split()))
    return out


def _expand_batch(tree: Any, n: int) -> Any:
    """Expand every tensor of a (dict / list / tuple) tree from batch 1 to batch ``n`` (views, no copy)."""
    if isinstance(tree, torch.Tensor):
        if tree.dim() == 0 or tree.shape[0] != 1:
            raise ValueError(f"image features must have batch size 1 to be shared, got shape {tuple(tree.shape)}")
        return tree.expand(n, *tree.shape[1:])
    if isinstance(tree, Mapping):
        return type(tree)({k: _expand_batch(v, n) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)):
        return type(tree)(_expand_batch(v, n) for v in tree)
    return tree


class PSALMPredictor:
    """Build a PSALM model from ``cfg`` and run it on user images and prompts (see module docstring).

    Attributes:
        cfg: the (cloned, frozen) config. model: the ``PSALM`` module, eval mode.
        device: ``torch.device``. autocast_dtype: None (fp32) or the autocast dtype.
    """

    def __init__(self, cfg):
        from psalm.modeling.meta_arch import build_psalm_model

        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.device = resolve_device(cfg.MODEL.DEVICE)
        self.autocast_dtype = resolve_inference_dtype(cfg.TEST.PSALM.DTYPE, self.device)
        self.image_size = int(cfg.INPUT.IMAGE_SIZE)
        self.pad_value = float(cfg.INPUT.PAD_VALUE)
        self.point_radius = int(cfg.INPUT.POINT_RADIUS)
        self.scribble_radius = int(cfg.INPUT.SCRIBBLE_RADIUS)
        self.default_task = cfg.MODEL.PSALM.TEST_TASK

        # PSALM or a registered subclass (e.g. the research extensions' ExtendedPSALM); anything else is refused there
        self.model = build_psalm_model(self.cfg, device=self.device)
        self.model.eval()
        if cfg.MODEL.WEIGHTS:
            self._load_weights(cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialisation (outputs are meaningless)")
        logger.info(
            "PSALMPredictor: device %s, %s", self.device,
            f"{self.autocast_dtype} autocast" if self.autocast_dtype is not None else "fp32",
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, opts: Sequence[str] = (), device: Optional[str] = None):
        """A predictor for a model directory (``model_final.pth`` + ``config.yaml`` + tokenizer, as written by
        ``tools/train_net.py`` and ``tools/convert_official.py``; :mod:`psalm.model_dir`).

        Args:
            model_dir: the directory.
            opts: config overrides, ``KEY VALUE`` pairs (``MODEL.WEIGHTS`` / ``MODEL.PSALM.TOKENIZER`` among
                them replace the directory's files).
            device: ``MODEL.DEVICE`` (default: the directory's config).
        Raises:
            FileNotFoundError / ValueError: not a model directory, no weights in it, a config this version
                cannot read, or weights that do not match the config.
        """
        from psalm.model_dir import model_dir_cfg

        opts = list(opts or ())
        if device is not None:
            opts += ["MODEL.DEVICE", str(device)]
        return cls(model_dir_cfg(model_dir, opts))

    # ------------------------------------------------------------------ public API
    def __call__(self, image: ImageLike, task: Optional[str] = None, **prompt) -> Dict:
        """Predict one image. Returns the model's output dict (``docs/DESIGN.md``, "Model output")."""
        return self.predict_batch([image], task, **prompt)[0]

    def predict_batch(
        self,
        images: Sequence[ImageLike],
        task: Optional[str] = None,
        prompts: Optional[Sequence[Mapping]] = None,
        batch_size: Optional[int] = None,
        **prompt,
    ) -> List[Dict]:
        """Predict several images in batched forwards.

        Args:
            images: paths / arrays / PIL images.
            task: the task of every image (default ``MODEL.PSALM.TEST_TASK``), unless a
                per-image prompt dict says otherwise.
            prompts: optional, one prompt dict per image (keywords of the module docstring, plus
                ``task``); otherwise ``**prompt`` applies to every image.
            batch_size: images per forward (default: all at once).
        """
        if isinstance(images, (str, os.PathLike, np.ndarray)) or not hasattr(images, "__len__"):
            raise ValueError("predict_batch takes a list of images; use predictor(image, ...) for one image")
        if not len(images):
            raise ValueError("predict_batch got an empty list of images")
        if prompts is not None:
            if prompt:
                raise ValueError("give either per-image `prompts` or shared prompt keywords, not both")
            if len(prompts) != len(images):
                raise ValueError(f"{len(prompts)} prompt dicts for {len(images)} images; give one per image")
            per_image = [dict(p) for p in prompts]
        else:
            per_image = [dict(prompt) for _ in images]
        inputs = []
        for img, p in zip(images, per_image):
            inputs.append(self.make_input(load_image(img), p.pop("task", task), **p))
        step = int(batch_size) if batch_size else len(inputs)
        if step <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        outputs: List[Dict] = []
        for i in range(0, len(inputs), step):
            outputs.extend(self.run(inputs[i : i + step]))
        return outputs

    def predict_prompts(self, image: ImageLike, prompts: Sequence[Mapping]) -> List[Dict]:
        """Several prompts (each a dict with ``task`` and its keywords) for ONE image.

        The image is decoded, preprocessed and encoded ONCE (``PSALM.encode_images``: backbone,
        projector and pixel decoder); every prompt reuses those features (expanded views, no copy)
        and the model runs one batched forward per task. Returns one output per prompt, in order.
        """
        if not prompts:
            raise ValueError("predict_prompts needs at least one prompt dict")
        rgb = load_image(image)
        image_t, padding_mask, new_hw = preprocess_image(rgb, self.image_size, self.pad_value)
        inputs = []
        for p in prompts:
            p = dict(p)
            inputs.append(self.make_input(rgb, p.pop("task", None), preprocessed=(image_t, padding_mask, new_hw), **p))
        features = self.encode_images(inputs[:1])
        # the model splits a mixed batch into one forward per task (and class count)
        return self.run(inputs, image_features=None if features is None else _expand_batch(features, len(inputs)))

    def make_input(self, image_rgb: np.ndarray, task: Optional[str] = None, preprocessed=None, **prompt) -> Dict:
        """One model input dict (``docs/DESIGN.md``, "Model input") from a uint8 RGB image and a prompt.

        ``preprocessed``: the :func:`~psalm.data.mapper.preprocess_image` result of this image, to reuse.
        Raises ``ValueError`` for a prompt that does not fit the task (see the module docstring).
        """
        task = check_task(task or self.default_task)
        if task not in _TASK_KEYWORDS:
            raise ValueError(f"task {task!r} is not supported by the predictor; use one of {sorted(_TASK_KEYWORDS)}")
        unknown = sorted(set(prompt) - set(_TASK_KEYWORDS[task]))
        if unknown:
            raise ValueError(
                f"prompt keyword(s) {unknown} do not apply to task {task!r}; it takes {list(_TASK_KEYWORDS[task])}"
            )
        height, width = image_rgb.shape[:2]
        image_t, padding_mask, new_hw = preprocessed or preprocess_image(image_rgb, self.image_size, self.pad_value)
        inp = {"image": image_t, "padding_mask": padding_mask, "height": height, "width": width, "task": task}
        if task in CATEGORY_TASKS:
            if prompt.get("classes") is None:
                raise ValueError(f"task {task!r} needs classes=[...], the category names to segment")
            names = _clean_strings(prompt["classes"], "classes")
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"classes contains duplicates {dupes}; give each category once")
            if "background" in names:
                raise ValueError("'background' is appended by the model; remove it from classes")
            is_thing = prompt.get("is_thing")
            is_thing = [True] * len(names) if is_thing is None else [bool(v) for v in is_thing]
            if len(is_thing) != len(names):
                raise ValueError(f"is_thing has {len(is_thing)} entries for {len(names)} classes")
            inp["class_names"], inp["is_thing"] = names, is_thing
        elif task in SENTENCE_TASKS:
            if prompt.get("text") is None:
                raise ValueError(f"task {task!r} needs text='...', the referring expression")
            inp["sentences"] = _clean_strings(prompt["text"], "text")
        elif task == "interactive":
            regions = parse_visual_prompts((height, width), **prompt)
            masks = rasterize_regions(regions, (height, width), self.point_radius, self.scribble_radius)
            inp["region_masks"] = self._resize_regions(masks, new_hw)
        elif task == "instruction":
            question = prompt.get("question")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"task 'instruction' needs question='...', a non-empty text; got {question!r:.40}")
            inp["conversation"] = [{"from": "human", "value": question.strip()}]
        return inp

    def encode_images(self, inputs: Sequence[Dict]):
        """The model's image features for ``inputs`` (None if the model cannot share them)."""
        if not hasattr(self.model, "encode_images"):
            if not getattr(self, "_warned_no_encode", False):
                self._warned_no_encode = True
                logger.warning("the PSALM model has no encode_images(); every prompt re-encodes the image")
            return None
        with torch.no_grad(), autocast_context(self.device, self.autocast_dtype):
            return self.model.encode_images(list(inputs))

    def run(self, inputs: Sequence[Dict], image_features=None) -> List[Dict]:
        """Run the model on ready input dicts (no grad, configured precision)."""
        kwargs = {} if image_features is None else {"image_features": image_features}
        with torch.no_grad(), autocast_context(self.device, self.autocast_dtype):
            return self.model(list(inputs), **kwargs)

    # ------------------------------------------------------------------ helpers
    def _load_weights(self, path: str) -> None:
        """Load ``MODEL.WEIGHTS`` (a file, or a model directory) with the project's ``DetectionCheckpointer`` (``PSALMCheckpointer``:
        ``weights_only`` torch files, safetensors, detectron2 .pkl); a checkpoint that leaves model
        parameters missing or mis-shaped is an error, not a silently half-random model."""
        from psalm.engine.checkpoint import load_model_weights
        from psalm.model_dir import resolve_weights

        load_model_weights(self.model, resolve_weights(path))  # a model directory gives its model_final.pth
        self.model.eval()

    def _resize_regions(self, masks: np.ndarray, new_hw) -> torch.Tensor:
        """[R, H, W] bool at the original size -> [R, S, S]; a region too small to survive the
        nearest-neighbour resize keeps the one resized pixel containing its centre of mass."""
        out = resize_pad_masks(masks, new_hw, self.image_size)
        h, w = masks.shape[1:]
        for r in torch.nonzero(~out.flatten(1).any(1)).flatten().tolist():
            ys, xs = np.nonzero(masks[r])
            row = min(int(ys.mean() * new_hw[0] / h), new_hw[0] - 1)
            col = min(int(xs.mean() * new_hw[1] / w), new_hw[1] - 1)
            out[r, row, col] = True
            logger.debug("region %d vanished in the resize; kept pixel (%d, %d)", r, row, col)
        return out

    # ------------------------------------------------------------------ video
    def predict_video(self, frames: Iterable[ImageLike], first_frame_masks: np.ndarray) -> Iterator:
        """Semi-supervised video object segmentation from the objects' masks in frame 0.

        A thin front end to :class:`psalm.inference.VideoObjectSegmenter` (the one implementation
        of the official DAVIS propagation protocol, ``TEST.PSALM.VIDEO.*``): frame t's visual prompts
        are the masks predicted for the memory frame, pooled from that frame's encoding.

        Args:
            frames: frame 0 first; paths / arrays / PIL images of one size.
            first_frame_masks: an integer label map [H, W] (0 background, 255 void, k object k), or
                bool masks [N, H, W], one per object (objects 1..N; later masks win on overlap).
        Yields:
            one :class:`psalm.inference.FrameResult` per frame, frame 0 included (``label_map``,
            per-object ``masks`` and ``scores``, ``memory_updated``).
        """
        from psalm.evaluation.davis import paint_objects
        from psalm.inference import VideoObjectSegmenter

        first = np.asarray(first_frame_masks)
        if first.ndim == 3:
            if first.shape[0] == 0 or first.shape[0] > 254:
                raise ValueError(f"first_frame_masks must hold 1..254 object masks, got {first.shape[0]}")
            empty = [i for i in range(first.shape[0]) if not first[i].any()]
            if empty:
                raise ValueError(f"first-frame object mask(s) {empty} are empty; every object needs pixels in frame 0")
            first = paint_objects(first.astype(bool), list(range(1, first.shape[0] + 1)))
        segmenter = VideoObjectSegmenter(self.cfg, self.model, autocast_dtype=self.autocast_dtype)
        return segmenter.propagate(frames, first)


