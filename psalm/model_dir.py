"""Model directories: the unit users pass around.

A *model directory* holds everything needed to run one model::

    DIR/model_final.pth      the weights ({"model": state_dict}; a .safetensors file works too)
    DIR/config.yaml          the psalm config the weights belong to
    DIR/tokenizer.json ...   the tokenizer (HF files: tokenizer.json, tokenizer_config.json, ...)

``tools/convert_official.py`` writes one; so does ``tools/train_net.py`` (its ``OUTPUT_DIR``: detectron2
writes ``config.yaml``, the trainer ``model_final.pth``, and :func:`save_tokenizer_to` the tokenizer).
The directory can be moved: the paths inside ``config.yaml`` are not used, the files next to it are.

* :func:`resolve_weights` turns ``MODEL.WEIGHTS`` (a file or a model directory) into the file to load;
* :func:`model_dir_cfg` builds the config of a model directory (``PSALMPredictor.from_pretrained``,
  ``demo/demo.py --model``, ``demo/app.py --model``);
* :func:`apply_model_dir_weights` lets ``MODEL.WEIGHTS DIR`` work in a config given separately
  (``tools/train_net.py ... MODEL.WEIGHTS DIR``);
* :func:`no_model_message` says how to get a model when there is none.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
from typing import Optional, Sequence

__all__ = [
    "WEIGHT_FILES",
    "TOKENIZER_FILES",
    "MAIN_JOB_DIR",
    "is_model_dir",
    "has_tokenizer",
    "resolve_weights",
    "model_dir_cfg",
    "apply_model_dir_weights",
    "save_tokenizer_to",
    "no_model_message",
]

logger = logging.getLogger(__name__)

# in order of preference
WEIGHT_FILES = ("model_final.pth", "model_final.safetensors")
# the files of an HF tokenizer directory (the converters copy the same list)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
# the README main job's output directory (tools/train_net.py --config-file configs/tiny/psalm_synthetic.yaml)
MAIN_JOB_DIR = "output/tiny_synthetic"
MAIN_JOB_COMMAND = ".venv/bin/python tools/train_net.py --config-file configs/tiny/psalm_synthetic.yaml"


def no_model_message(looked_at: Optional[str] = None) -> str:
    """What to tell a user who has no trained model (demo without ``--model`` / ``MODEL.WEIGHTS``)."""
    where = f"No trained model at {looked_at!r}. " if looked_at else "No model weights given. "
    return where + _how_to_get_a_model()


def _how_to_get_a_model() -> str:
    return (
        "PSALM needs trained weights; with random weights its masks are meaningless. Get a model "
        "directory (model_final.pth + config.yaml + tokenizer) in one of two ways:\n"
        f"  1. train the README main job on the built-in synthetic data (about 15 min on a CPU, no downloads):\n"
        f"       {MAIN_JOB_COMMAND}\n"
        f"     which writes the model directory {MAIN_JOB_DIR}/;\n"
        "  2. convert the official PSALM release (MODEL_ZOO.md):\n"
        "       .venv/bin/python tools/convert_official.py --release /path/to/PSALM --output checkpoints/psalm\n"
        "Then pass the directory: --model output/tiny_synthetic (or --model checkpoints/psalm)."
    )


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds an HF tokenizer (``tokenizer.json`` or ``tokenizer_config.json``)."""
    d = pathlib.Path(directory)
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def is_model_dir(path: str | os.PathLike) -> bool:
    """A directory with a ``config.yaml`` (the weights may still be missing: :func:`resolve_weights` says)."""
    p = pathlib.Path(path)
    return p.is_dir() and (p / "config.yaml").is_file()


def resolve_weights(path: str | os.PathLike) -> str:
    """``MODEL.WEIGHTS`` as a file to load: a file is returned as is; a directory gives its
    ``model_final.pth`` (or ``model_final.safetensors``).

    Raises:
        FileNotFoundError: the path does not exist, or the directory has no final weights (the
            message names the latest intermediate checkpoint when there is one, e.g. a training
            run that has not finished).
    """
    p = pathlib.Path(path)
    if p.is_file():
        return str(p)
    if not p.exists():
        raise FileNotFoundError(f"MODEL.WEIGHTS={str(path)!r} does not exist (give a weights file or a model directory)")
    for name in WEIGHT_FILES:
        if (p / name).is_file():
            return str(p / name)
    hint = ""
    last = p / "last_checkpoint"
    if last.is_file():
        hint = (f"; its latest checkpoint is {last.read_text().strip()!r} (training not finished?): pass that "
                f"file, e.g. MODEL.WEIGHTS {p / last.read_text().strip()}")
    raise FileNotFoundError(
        f"model directory {str(p)!r} has no {' or '.join(WEIGHT_FILES)}{hint}. " + _how_to_get_a_model()
    )


def _check_same_tokenizer(model_dir: pathlib.Path, configured: str) -> None:
    """The weights of ``model_dir`` were trained with its tokenizer: a different configured one is an error."""
    a, b = model_dir / "tokenizer.json", pathlib.Path(configured) / "tokenizer.json"
    if a.is_file() and b.is_file() and a.resolve() != b.resolve() and a.read_bytes() != b.read_bytes():
        raise ValueError(
            f"MODEL.PSALM.TOKENIZER={configured!r} differs from the tokenizer stored with the weights in "
            f"{str(model_dir)!r}; the token ids would not match the model's embeddings. Set MODEL.PSALM.TOKENIZER "
            f"{model_dir} (or leave it empty)"
        )


def model_dir_cfg(model_dir: str | os.PathLike, opts: Sequence[str] = ()):
    """The config of a model directory: ``DIR/config.yaml`` + ``opts``, with ``MODEL.WEIGHTS`` set to
    the directory's weights and ``MODEL.PSALM.TOKENIZER`` to the directory when it holds a tokenizer
    (both unless ``opts`` set them). Returns a frozen config.

    Raises:
        FileNotFoundError / ValueError: not a model directory, no weights in it, or a config.yaml that
            this version of psalm cannot read (each message says what to do).
    """
    from psalm.config import get_psalm_cfg

    d = pathlib.Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {str(d)!r} does not exist. " + _how_to_get_a_model())
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{str(d)!r} is not a model directory: it has no config.yaml (a model directory holds model_final.pth, "
            "config.yaml and the tokenizer, as written by tools/train_net.py and tools/convert_official.py)"
        )
    opts = list(opts or ())
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs, got an odd number: {opts}")
    keys = opts[0::2]
    try:
        cfg = get_psalm_cfg(str(cfg_file), opts)
    except KeyError as e:
        raise ValueError(
            f"{cfg_file} does not match this version of psalm ({e}); the key was renamed or removed: edit the "
            "file, or re-create the directory with this version (train again or re-run the converter)"
        ) from e
    cfg.defrost()
    if "MODEL.WEIGHTS" not in keys:
        cfg.MODEL.WEIGHTS = resolve_weights(d)
    if "MODEL.PSALM.TOKENIZER" not in keys and has_tokenizer(d):
        cfg.MODEL.PSALM.TOKENIZER = str(d)
    elif not cfg.MODEL.PSALM.TOKENIZER and not cfg.MODEL.PSALM.LLM.NAME_OR_PATH:
        raise ValueError(f"model directory {str(d)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) and "
                         "its config sets no MODEL.PSALM.TOKENIZER; copy the tokenizer into the directory")
    elif cfg.MODEL.PSALM.TOKENIZER:
        _check_same_tokenizer(d, cfg.MODEL.PSALM.TOKENIZER)
    cfg.freeze()
    logger.info("model directory %s: weights %s, tokenizer %s", d, cfg.MODEL.WEIGHTS, cfg.MODEL.PSALM.TOKENIZER)
    return cfg


def apply_model_dir_weights(cfg) -> None:
    """In place (``cfg`` must be mutable): ``MODEL.WEIGHTS`` naming a model directory becomes the
    directory's weights file, and its tokenizer is used when ``MODEL.PSALM.TOKENIZER`` is empty (a
    different configured tokenizer is an error). A weights file or "" is left alone."""
    w = cfg.MODEL.WEIGHTS
    if not w or not os.path.isdir(w):
        return
    d = pathlib.Path(w)
    cfg.MODEL.WEIGHTS = resolve_weights(d)
    if has_tokenizer(d):
        if not cfg.MODEL.PSALM.TOKENIZER:
            cfg.MODEL.PSALM.TOKENIZER = str(d)
        else:
            _check_same_tokenizer(d, cfg.MODEL.PSALM.TOKENIZER)
    logger.info("MODEL.WEIGHTS is the model directory %s: loading %s", d, cfg.MODEL.WEIGHTS)


def save_tokenizer_to(cfg, output_dir: str | os.PathLike) -> Optional[pathlib.Path]:
    """Copy the tokenizer files of ``MODEL.PSALM.TOKENIZER`` (or ``MODEL.PSALM.LLM.NAME_OR_PATH``) into
    ``output_dir`` verbatim, so that the directory is a model directory. Returns ``output_dir``, or
    None (with a warning) when the config names no local tokenizer directory."""
    src = cfg.MODEL.PSALM.TOKENIZER or cfg.MODEL.PSALM.LLM.NAME_OR_PATH
    if not src or not os.path.isdir(src) or not has_tokenizer(src):
        logger.warning("no local tokenizer directory in the config (MODEL.PSALM.TOKENIZER=%r): %s will not hold a "
                       "tokenizer; copy it there to use the directory as a model directory", src, output_dir)
        return None
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pathlib.Path(src).resolve() == out.resolve():
        return out
    for name in TOKENIZER_FILES:
        f = pathlib.Path(src) / name
        if f.is_file():
            tmp = out / f".{name}.tmp{os.getpid()}"
            shutil.copyfile(f, tmp)
            os.replace(tmp, out / name)
    logger.info("tokenizer of %s copied into %s", src, out)
    return out
