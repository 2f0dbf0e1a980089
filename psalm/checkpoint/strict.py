"""Strict state-dict loading with a complete report.

``torch.nn.Module.load_state_dict(strict=False)`` silently skips keys and raises on shape mismatch
after partially loading; the official PSALM code relies on it and loses weights without notice.
``load_strict`` checks everything first, loads nothing unless the state dict is acceptable, and
raises :class:`IncompatibleKeysError` listing every problem. Exceptions are granted by name only
(exact key or ``fnmatch`` pattern), never silently.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

__all__ = ["LoadReport", "IncompatibleKeysError", "check_state_dict", "load_strict"]


@dataclasses.dataclass
class LoadReport:
    """Keys of a state dict compared with a module's ``state_dict()``."""

    missing: list[str]  # in the module, not in the checkpoint
    unexpected: list[str]  # in the checkpoint, not in the module
    mismatched: list[tuple[str, tuple, tuple]]  # (key, checkpoint shape, module shape)
    allowed_missing: list[str] = dataclasses.field(default_factory=list)
    allowed_unexpected: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: int = 50) -> str:
        lines = []
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"{len(keys)} {title} key(s):")
                lines += [f"  {k}" for k in keys[:limit]]
                if len(keys) > limit:
                    lines.append(f"  ... and {len(keys) - limit} more")
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} mis-shaped key(s) (checkpoint vs model):")
            lines += [f"  {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched[:limit]]
        if self.allowed_missing:
            lines.append(f"{len(self.allowed_missing)} missing key(s) allowed by name")
        if self.allowed_unexpected:
            lines.append(f"{len(self.allowed_unexpected)} unexpected key(s) allowed by name")
        return "\n".join(lines) if lines else "all keys match"


class IncompatibleKeysError(RuntimeError):
    """Raised when a state dict does not match a module exactly (after allowed exceptions)."""

    def __init__(self, report: LoadReport, what: str = "state dict"):
        self.report = report
        super().__init__(
            f"{what} does not match the model:\n{report.format()}\n"
            "Fix the checkpoint or the config, or pass the keys that may legitimately differ "
            "(allow_missing / allow_unexpected)."
        )


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or fnmatch.fnmatchcase(key, p) for p in patterns)


def check_state_dict(
    module_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> LoadReport:
    """Compare ``state_dict`` with a module (or a reference state dict) without loading anything."""
    ref = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    allow_missing, allow_unexpected = list(allow_missing), list(allow_unexpected)
    missing, allowed_missing, unexpected, allowed_unexpected, mismatched = [], [], [], [], []
    for k in ref:
        if k not in state_dict:
            (allowed_missing if _matches(k, allow_missing) else missing).append(k)
    for k, v in state_dict.items():
        if k not in ref:
            (allowed_unexpected if _matches(k, allow_unexpected) else unexpected).append(k)
        elif tuple(v.shape) != tuple(ref[k].shape):
            mismatched.append((k, tuple(v.shape), tuple(ref[k].shape)))
    return LoadReport(missing, unexpected, mismatched, allowed_missing, allowed_unexpected)


def load_strict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    what: str = "state dict",
) -> LoadReport:
    """Load ``state_dict`` into ``module``; raise :class:`IncompatibleKeysError` unless it matches.

    Keys that may be absent (``allow_missing``) keep the module's values; keys that may be extra
    (``allow_unexpected``) are dropped. Both are logged. Works for modules on the meta device too
    (``assign=True`` materialises the checkpoint tensors).
    """
    report = check_state_dict(module, state_dict, allow_missing, allow_unexpected)
    if not report.ok:
        raise IncompatibleKeysError(report, what)
    sd = {k: v for k, v in state_dict.items() if k not in set(report.allowed_unexpected)}
    on_meta = any(p.is_meta for p in module.parameters())
    module.load_state_dict(sd, strict=False, assign=on_meta)
    if report.allowed_missing or report.allowed_unexpected:
        logger.info("Loaded %s with allowed differences: %s", what, report.format(limit=10))
    return report
