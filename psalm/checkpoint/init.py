"""Initial weights of a training run, from several files, each for its key prefixes, strictly.

Stage 2 of PSALM starts from three upstream sources (``MODEL_ZOO.md``): Mask2Former's Swin-B COCO
panoptic model for the Swin, the pixel decoder and the decoder (``tools/convert_mask2former.py``),
phi-1_5 for the language model (``tools/convert_phi.py``) and the stage-1 run's projector. The config
names them in ``MODEL.PSALM.INIT.WEIGHTS`` as entries ``[file, prefix, ...]``::

    INIT:
      WEIGHTS: [["checkpoints/m2f_swin_b.pth", "backbone.", "pixel_decoder.", "predictor."],
                ["checkpoints/phi15_psalm.pth", "llm."],
                ["output/psalm_stage1_projector/model_final.pth", "projector."]]
      RANDOM: ["mask_tokens", "mask_token_projector.*", ...]

:func:`plan_initialization` decides, for every key of the model's ``state_dict()``, where it comes from
and fails with one report of everything wrong: a key that no source covers, a key covered twice (two
entries, or an entry and a ``RANDOM`` pattern), a key that its file lacks (unless the file's converter
listed it as absent by design, ``allowed_missing``, or it matches ``RANDOM``), a file key under an
entry's prefixes that the model does not have, a mis-shaped tensor. File keys outside the entry's
prefixes are ignored on purpose (e.g. everything but ``projector.*`` of a stage-1 checkpoint) and
counted in the log.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import pathlib
from typing import Iterable, Mapping, Sequence

import torch

from .strict import IncompatibleKeysError, LoadReport

logger = logging.getLogger(__name__)

__all__ = ["InitEntry", "InitPlan", "InitWeightsError", "parse_init_entries", "read_weights_file",
           "plan_initialization", "llm_weights_dir"]

_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class InitWeightsError(IncompatibleKeysError):
    """The initial weights do not cover the model exactly once (the message lists every problem).

    An :class:`~psalm.checkpoint.strict.IncompatibleKeysError` whose ``report`` (a
    :class:`~psalm.checkpoint.strict.LoadReport`) has the uncovered and missing keys as ``missing``, the
    unexpected and mis-shaped ones; ``covered_twice`` and ``frozen_random`` list the other two problems.
    """

    def __init__(self, message: str, report: LoadReport, covered_twice=(), frozen_random=()):
        self.report = report
        self.covered_twice = list(covered_twice)
        self.frozen_random = list(frozen_random)
        RuntimeError.__init__(self, message)


@dataclasses.dataclass
class InitEntry:
    path: str
    prefixes: tuple[str, ...]
    what: str  # how the config names it, for messages


@dataclasses.dataclass
class InitPlan:
    """Where every model key comes from."""

    state_dict: dict[str, torch.Tensor]  # the tensors to load (keys covered by a file)
    source: dict[str, str]  # model key -> file, "MODEL.PSALM.LLM.NAME_OR_PATH=..." or "random"
    random_keys: list[str]  # keys that keep their initialisation (RANDOM / allowed_missing / from scratch)
    ignored: dict[str, int]  # file -> number of its keys outside its entry's prefixes

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for src in self.source.values():
            counts[src] = counts.get(src, 0) + 1
        lines = [f"  {n:6d} keys from {src}" for src, n in sorted(counts.items())]
        lines += [f"  ({n} keys of {f} outside its prefixes: not used)" for f, n in self.ignored.items() if n]
        return "\n".join(lines)


def parse_init_entries(entries: Sequence, weights: str = "") -> list[InitEntry]:
    """``MODEL.PSALM.INIT.WEIGHTS`` (+ a non-empty ``MODEL.WEIGHTS`` as prefix ``""``) -> entries."""
    out = []
    for i, entry in enumerate(entries):
        what = f"MODEL.PSALM.INIT.WEIGHTS[{i}]"
        if isinstance(entry, str) or not isinstance(entry, (list, tuple)) or len(entry) < 2 or not all(
            isinstance(x, str) for x in entry
        ):
            raise ValueError(
                f"{what} = {entry!r}: each entry is a list [file, prefix, ...], e.g. "
                '["checkpoints/m2f_swin_b.pth", "backbone.", "pixel_decoder.", "predictor."]'
            )
        path, prefixes = entry[0], tuple(entry[1:])
        bad = [p for p in prefixes if p and not p.endswith(".")]
        if bad:
            raise ValueError(f"{what}: prefixes must end with '.' (a module name) or be '' (every key), got {bad}")
        out.append(InitEntry(path, prefixes, what))
    if weights:
        out.append(InitEntry(weights, ("",), "MODEL.WEIGHTS"))
    for e in out:
        if not os.path.isfile(e.path):
            raise FileNotFoundError(
                f"{e.what}: {e.path!r} does not exist. The stage-2 files are written by tools/convert_mask2former.py, "
                "tools/convert_phi.py and the stage-1 run (MODEL_ZOO.md, docs/TRAINING.md)"
            )
    return out


def read_weights_file(path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict, keys absent by design) of a psalm ``.pth`` / ``.pt`` / ``.safetensors`` file.

    ``.pth`` files are memory-mapped (``torch.load(mmap=True)``): tensors are read from the page cache
    as they are copied into the model, not loaded into each process's memory first.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path)), []
    if not path.endswith((".pth", ".pt")):
        raise ValueError(
            f"{path!r}: initial weights must be a .pth / .pt / .safetensors file with psalm key names; convert a "
            "Mask2Former .pkl with tools/convert_mask2former.py and an HF phi-1_5 directory with tools/convert_phi.py"
        )
    data = load_torch_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} holds a {type(data).__name__}, expected a dict of tensors")
    sd = data["model"] if isinstance(data.get("model"), dict) else data
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path!r}: values of {bad[:5]} are not tensors")
    return dict(sd), list(data.get("allowed_missing", []) if sd is not data else [])


def load_torch_file(path: str):
    """``torch.load(path, map_location="cpu", weights_only=True, mmap=True)`` (no mmap for legacy files)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        logger.info("%s is in torch's legacy format (no mmap): loading it into memory", path)
        return torch.load(path, map_location="cpu", weights_only=True)


def llm_weights_dir(cfg) -> str:
    """``MODEL.PSALM.LLM.NAME_OR_PATH`` when the model's LLM is loaded from its weights at build time, else ``""``."""
    path = cfg.MODEL.PSALM.LLM.NAME_OR_PATH
    if path and any((pathlib.Path(path) / f).is_file() for f in _HF_WEIGHT_FILES):
        return path
    return ""


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or fnmatch.fnmatchcase(key, p) for p in patterns)


def _group(keys: Sequence[str], limit: int = 8) -> str:
    """Keys grouped by top-level module: ``backbone (120 keys: backbone.a, ...)``."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split(".", 1)[0], []).append(k)
    lines = []
    for top, ks in groups.items():
        shown = ", ".join(ks[:limit]) + (", ..." if len(ks) > limit else "")
        lines.append(f"    {top}: {len(ks)} key(s): {shown}")
    return "\n".join(lines)


def plan_initialization(
    model_shapes: Mapping[str, Sequence[int]],
    entries: Sequence[InitEntry],
    *,
    random_patterns: Sequence[str] = (),
    from_scratch: bool = False,
    prebuilt: Mapping[str, str] | None = None,
    frozen: Iterable[str] = (),
    frozen_random: Sequence[str] = (),
) -> InitPlan:
    """Decide the source of every model key; raise :class:`InitWeightsError` listing every problem.

    Args:
        model_shapes: key -> shape of the model's ``state_dict()`` (global shapes under FSDP).
        entries: from :func:`parse_init_entries`.
        random_patterns: ``MODEL.PSALM.INIT.RANDOM``.
        from_scratch: ``MODEL.PSALM.INIT.FROM_SCRATCH``: keys no source covers start random.
        prebuilt: prefix -> source name of parts already loaded when the model was built (the LLM
            from ``MODEL.PSALM.LLM.NAME_OR_PATH``).
        frozen: names of the parameters that do not train. One of them left random is an error (it
            would never learn) unless ``from_scratch`` or it matches ``frozen_random``
            (``MODEL.PSALM.INIT.FROZEN_RANDOM``: parts the stage never uses).
    """
    prebuilt = dict(prebuilt or {})
    files = {}
    for e in entries:
        if e.path not in files:
            files[e.path] = read_weights_file(e.path)
    owners: dict[str, list[str]] = {k: [] for k in model_shapes}
    entry_of: dict[str, InitEntry] = {}
    for k in model_shapes:
        for prefix, name in prebuilt.items():
            if k.startswith(prefix):
                owners[k].append(name)
        for e in entries:
            if any(k.startswith(p) for p in e.prefixes):
                owners[k].append(f"{e.what} ({e.path})")
                entry_of[k] = e
        if _matches(k, random_patterns):
            owners[k].append("MODEL.PSALM.INIT.RANDOM")

    twice = {k: o for k, o in owners.items() if len(o) > 1}
    uncovered = [] if from_scratch else [k for k, o in owners.items() if not o]
    missing, mismatched, unexpected = [], [], []
    state, source, random_keys = {}, {}, []
    for k, shape in model_shapes.items():
        if k in twice:
            continue
        if not owners[k]:
            if from_scratch:
                random_keys.append(k)
                source[k] = "random (MODEL.PSALM.INIT.FROM_SCRATCH)"
            continue
        owner = owners[k][0]
        if owner == "MODEL.PSALM.INIT.RANDOM":
            random_keys.append(k)
            source[k] = "random (MODEL.PSALM.INIT.RANDOM)"
        elif k in entry_of:
            e = entry_of[k]
            sd, allowed_missing = files[e.path]
            if k in sd:
                if tuple(sd[k].shape) != tuple(shape):
                    mismatched.append((k, tuple(sd[k].shape), tuple(shape), e.path))
                else:
                    state[k] = sd[k]
                    source[k] = e.path
            elif k in allowed_missing:
                random_keys.append(k)
                source[k] = f"random (absent from {e.path} by design)"
            else:
                missing.append((k, e.path))
        else:
            source[k] = owner
    ignored = {}
    for e in entries:
        sd, _ = files[e.path]
        for k in sd:
            if any(k.startswith(p) for p in e.prefixes):
                if k not in model_shapes:
                    unexpected.append((k, e.path))
    for path, (sd, _) in files.items():
        used = [e for e in entries if e.path == path]
        ignored[path] = sum(1 for k in sd if not any(k.startswith(p) for e in used for p in e.prefixes))

    frozen = set(frozen)
    frozen_left_random = [] if from_scratch else [
        k for k in model_shapes if k in frozen and (k in uncovered or k in random_keys) and not _matches(k, frozen_random)
    ]
    problems = []
    if frozen_left_random:
        problems.append(
            f"  {len(frozen_left_random)} FROZEN parameter(s) would stay randomly initialised and never learn "
            "(frozen by MODEL.PSALM.FREEZE_BACKBONE, MODEL.PSALM.LLM.FREEZE or SOLVER.TRAINABLE_PARAMETERS):\n"
            + _group(frozen_left_random)
        )
    if uncovered:
        problems.append(
            f"  {len(uncovered)} model key(s) come from no source (they would stay randomly initialised):\n"
            + _group(uncovered)
        )
    if twice:
        problems.append(f"  {len(twice)} key(s) covered more than once:\n" + "\n".join(
            f"    {k}: {', '.join(o)}" for k, o in list(twice.items())[:10]))
    if missing:
        problems.append(f"  {len(missing)} key(s) missing from the file that should provide them:\n" + "\n".join(
            f"    {k} (from {p})" for k, p in missing[:20]) + ("\n    ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"  {len(unexpected)} file key(s) under an entry's prefixes that the model does not have:\n"
                        + "\n".join(f"    {k} (in {p})" for k, p in unexpected[:20]))
    if mismatched:
        problems.append(f"  {len(mismatched)} mis-shaped key(s) (file vs model):\n" + "\n".join(
            f"    {k}: {a} vs {b} (in {p})" for k, a, b, p in mismatched[:20]))
    if problems:
        report = LoadReport(missing=uncovered + [k for k, _ in missing], unexpected=[k for k, _ in unexpected],
                            mismatched=[(k, a, b) for k, a, b, _ in mismatched])
        raise InitWeightsError(
            "the initial weights do not cover the model exactly once:\n" + "\n".join(problems) + "\n"
            "Fix: give each part one source in MODEL.PSALM.INIT.WEIGHTS, entries [file, prefix, ...] (the stage-2 "
            "recipe: docs/TRAINING.md 'Initial weights', MODEL_ZOO.md); list keys that start from their "
            "initialisation on purpose in MODEL.PSALM.INIT.RANDOM and frozen parts that this stage never uses in "
            "MODEL.PSALM.INIT.FROZEN_RANDOM; a run that trains from scratch on purpose sets "
            "MODEL.PSALM.INIT.FROM_SCRATCH True",
            report, covered_twice=sorted(twice), frozen_random=frozen_left_random,
        )
    return InitPlan(state, source, random_keys, ignored)
