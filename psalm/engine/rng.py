"""Random-number-generator state: capture / restore for exact resume, and separate streams.

A training step draws random numbers in two places: the data pipeline (when it runs in the main
process) and the model (dropout, point sampling, ...). :class:`RNGStreams` gives each its own
state, so that (a) the model's stream does not depend on how the data loader was (re)started and
(b) both streams are saved in checkpoints and restored exactly.

States are stored as plain Python / tensor values, so checkpoints load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import random
from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seeded_rng_state", "RNGStreams", "preserve_rng_state"]


def capture_rng_state(cuda: Optional[bool] = None) -> Dict:
    """The global Python, NumPy and torch (CPU, and CUDA if ``cuda``) RNG states."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict) -> None:
    """Set the global RNGs to a state from :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
            "has_gauss": npst["has_gauss"],
            "gauss": npst["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"checkpoint has CUDA RNG states of {len(cuda_states)} devices, this process sees "
                f"{torch.cuda.device_count()}; resume with the same devices per process"
            )
        torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def preserve_rng_state():
    """Run a block without changing the global RNG states (e.g. evaluation during training)."""
    saved = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(saved)


def seeded_rng_state(seed: int) -> Dict:
    """The state all global RNGs would have after being seeded with ``seed`` (globals untouched)."""
    with preserve_rng_state():
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return capture_rng_state(cuda=False)


class RNGStreams:
    """Two RNG streams: the global one (model) and a data stream swapped in around data loading.

    Args:
        data_seed: seed of the data stream (e.g. ``SEED + 1000003 * (rank + 1)``).
    """

    def __init__(self, data_seed: int):
        self._data_state = seeded_rng_state(int(data_seed))

    @contextlib.contextmanager
    def data_stream(self):
        """Inside the block the global RNGs are the data stream; afterwards the model stream again."""
        model_state = capture_rng_state(cuda=False)
        restore_rng_state(self._data_state)
        try:
            yield
        finally:
            self._data_state = capture_rng_state(cuda=False)
            restore_rng_state(model_state)

    def state_dict(self) -> Dict:
        return {"model": capture_rng_state(), "data": self._data_state}

    def load_state_dict(self, state: Dict) -> None:
        self._data_state = state["data"]
        restore_rng_state(state["model"])
