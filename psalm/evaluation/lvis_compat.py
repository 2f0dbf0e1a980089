"""Make the ``lvis`` package (0.5.3, its last release) run on numpy >= 1.24.

``lvis.eval.LVISEval.accumulate`` uses ``np.float``, an alias numpy removed in 1.24, so LVIS AP
(detectron2's ``LVISEvaluator``) crashes on our numpy 2 stack. :func:`patch_lvis_numpy_aliases`
gives the ``lvis.eval`` module (and only it) a numpy view that still has the removed scalar
aliases, each bound to the builtin it stood for (``np.float`` was ``float``), so the results
are those of the original code. numpy itself is not modified.
"""

from __future__ import annotations

import logging
import types

import numpy as np

logger = logging.getLogger(__name__)

# aliases numpy 1.24 removed -> the builtins they were
_REMOVED_ALIASES = {"float": float, "int": int, "bool": bool, "object": object, "complex": complex, "str": str}


class _NumpyWithRemovedAliases(types.ModuleType):
    """``numpy`` plus its removed builtin aliases; every other attribute comes from numpy."""

    def __init__(self) -> None:
        super().__init__("numpy")
        for name, value in _REMOVED_ALIASES.items():
            setattr(self, name, value)

    def __getattr__(self, name: str):
        return getattr(np, name)


def patch_lvis_numpy_aliases() -> bool:
    """Give ``lvis.eval`` the aliases it needs when numpy lacks them; True when patched (idempotent).

    Raises ImportError (with the install command) when ``lvis`` is not installed.
    """
    try:
        import lvis.eval as lvis_eval
    except ImportError as e:
        raise ImportError(
            "LVIS evaluation needs the 'lvis' package (pip install -c scripts/constraints.txt lvis==0.5.3)"
        ) from e
    if isinstance(lvis_eval.np, _NumpyWithRemovedAliases):
        return True
    if all(hasattr(np, name) for name in _REMOVED_ALIASES):
        return False  # old numpy: nothing to do
    lvis_eval.np = _NumpyWithRemovedAliases()
    logger.debug("lvis.eval: numpy removed-alias shim installed (numpy %s)", np.__version__)
    return True
