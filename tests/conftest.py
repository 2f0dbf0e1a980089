"""Shared test fixtures. Every test runs on CPU with tiny configs and random weights."""
import logging
import os
import pathlib

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = pathlib.Path(
    os.environ.get("PSALM_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "reference" / "golden")
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def golden_dir():
    """The official-code reference data (../shared/reference/golden). Required in CI."""
    if not (GOLDEN_DIR / "psalm_e2e" / "state_dict.safetensors").is_file():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"golden reference data missing at {GOLDEN_DIR} (set PSALM_GOLDEN_DIR)")
        pytest.skip(f"golden reference data not found at {GOLDEN_DIR}; set PSALM_GOLDEN_DIR")
    return GOLDEN_DIR


@pytest.fixture
def restore_psalm_loggers():
    """Undo what a tool's detectron2 ``setup_logger`` did to the 'psalm' / 'detectron2' loggers (handlers,
    propagation, level), so one test's tool run does not change another test's logging."""
    names = ("psalm", "detectron2")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in names}
    yield
    for n, (handlers, propagate, level) in saved.items():
        lg = logging.getLogger(n)
        for h in lg.handlers:
            if h not in handlers:
                lg.removeHandler(h)
        lg.propagate, lg.level = propagate, level
