"""Shared plumbing of the ``datasets/prepare_*.py`` scripts: arguments, logging, atomic JSON output."""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
from typing import Callable, Sequence

from tqdm import tqdm

from ._common import datasets_root


def prepare_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with ``--root`` (default $DETECTRON2_DATASETS or ./datasets) and ``--log-level``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default=datasets_root(), help="data-set root (default: $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def setup_logging(level: str = "INFO") -> logging.Logger:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return logging.getLogger("psalm.prepare")


def require_input(path: str, what: str, is_dir: bool = False) -> str:
    """Exit-worthy error naming a missing input of a prepare script and where it comes from."""
    if not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
        raise FileNotFoundError(f"input {path!r} not found: {what} (see datasets/README.md)")
    return path


def read_json(path: str, what: str):
    require_input(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r} is not valid JSON ({e}): {what}") from e


def map_items(fn: Callable, items: Sequence, workers: int = 1, desc: str = "", chunksize: int = 16) -> list:
    """``[fn(x) for x in items]`` with a tqdm bar, in a process pool when ``workers > 1``; results keep
    the order of ``items`` whatever ``workers`` is (deterministic outputs)."""
    if workers > 1:
        with mp.Pool(workers) as pool:
            return list(tqdm(pool.imap(fn, items, chunksize=chunksize), total=len(items), desc=desc))
    return [fn(x) for x in tqdm(items, desc=desc)]


def write_json(path: str, obj, logger: logging.Logger | None = None) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file + rename); creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
    if logger is not None:
        logger.info("wrote %s", path)
    return path
