"""Shared test fixtures. Every test runs on CPU with tiny configs and random weights."""
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
