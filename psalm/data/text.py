"""Small text helpers shared by the data generators and the projects' prompt templates."""
from __future__ import annotations

from typing import Iterable

__all__ = ["join_phrases"]


def join_phrases(items: Iterable) -> str:
    """The English list join: ``"a"``, ``"a and b"``, ``"a, b and c"`` (no serial comma).

    It is the official join of PixelLM's multi-target templates and the one of the synthetic captions;
    the items are converted with ``str``. An empty list is a ``ValueError``.
    """
    items = [str(x) for x in items]
    if not items:
        raise ValueError("join_phrases needs at least one phrase")
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
