"""Language for the synthetic data set: referring expressions, their exact meaning, and captions.

Every expression is a small structured query over the objects of one scene. ``evaluate`` returns
the indices of the objects it denotes; ``render`` turns it into the sentence stored in the data
set. The generator keeps an expression only when its meaning is what it is used for (exactly one
target for referring, all matches for "all ..." expressions, nothing for no-target ones), so the
ground truth is correct by construction and can be re-checked from the text alone.

Grammar (S = size ``small|large``, C = colour, N = shape noun; ``all`` expressions may also use
``objects``):

* ``the [S] [C] N``                                 - the single object with these attributes
* ``the [S] [C] N on the left|on the right|at the top|at the bottom``
                                                     - among the matches, the one with the smallest /
                                                       largest centre x / y; the runner-up must be at
                                                       least ``SUPERLATIVE_GAP`` x image size further
* ``the [S] [C] N left of|right of|above|below the [S] [C] N``
                                                     - matches whose box lies entirely on that side of
                                                       the (unique) landmark's box
* ``all [S] [C] Ns``                                - every match (generalized referring)

Object records used here are dicts with ``shape``, ``color``, ``size``, ``bbox`` (x0, y0, x1, y1,
inclusive pixel extents of the mask) and ``center`` (cx, cy, the mask centroid).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence

import numpy as np

from .text import join_phrases

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "RELATIONS",
    "DIRECTIONS",
    "SUPERLATIVE_GAP",
    "Descriptor",
    "Expression",
    "evaluate",
    "render",
    "unique_expressions",
    "minimal_expressions",
    "plural_expressions",
    "no_target_expressions",
    "caption",
]

SHAPES = ("circle", "square", "triangle", "diamond")
# name -> RGB; saturated colours that stay far apart from each other and from the muted backgrounds
COLORS = {
    "red": (220, 45, 45),
    "green": (40, 170, 70),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 40),
    "purple": (155, 65, 195),
}
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
DIRECTIONS = ("on the left", "on the right", "at the top", "at the bottom")
# the extreme object of a superlative must beat the runner-up by this fraction of the image size
SUPERLATIVE_GAP = 0.08


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """Attribute filter; ``None`` means "any". ``shape=None`` is rendered as ``object``."""

    size: Optional[str] = None
    color: Optional[str] = None
    shape: Optional[str] = None

    def matches(self, obj: dict) -> bool:
        return all(
            want is None or obj[key] == want
            for key, want in (("size", self.size), ("color", self.color), ("shape", self.shape))
        )

    def phrase(self, plural: bool = False) -> str:
        noun = self.shape or "object"
        words = [w for w in (self.size, self.color) if w] + [noun + ("s" if plural else "")]
        return " ".join(words)

    @property
    def num_attributes(self) -> int:
        return sum(v is not None for v in (self.size, self.color, self.shape))

    def weakenings(self) -> list["Descriptor"]:
        """The descriptors with exactly one attribute dropped."""
        out = []
        for key in ("size", "color", "shape"):
            if getattr(self, key) is not None:
                out.append(dataclasses.replace(self, **{key: None}))
        return out


@dataclasses.dataclass(frozen=True)
class Expression:
    """``kind``: ``simple`` | ``superlative`` | ``relation`` | ``all``."""

    kind: str
    target: Descriptor
    direction: Optional[str] = None  # superlative
    relation: Optional[str] = None  # relation
    landmark: Optional[Descriptor] = None  # relation

    def to_json(self) -> dict:
        """A JSON-able dict (``None`` fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def simplifications(self) -> list["Expression"]:
        """Strictly simpler expressions: one attribute dropped, or the position clause dropped."""
        out = [dataclasses.replace(self, target=d) for d in self.target.weakenings() if d.shape or self.kind == "all"]
        if self.kind in ("superlative", "relation"):
            out.append(Expression("simple", self.target))
        return out


def _side(a_box, b_box, relation: str) -> bool:
    """Whether box ``a`` lies entirely on the ``relation`` side of box ``b`` (x0, y0, x1, y1)."""
    ax0, ay0, ax1, ay1 = a_box
    bx0, by0, bx1, by1 = b_box
    if relation == "left of":
        return ax1 < bx0
    if relation == "right of":
        return ax0 > bx1
    if relation == "above":
        return ay1 < by0
    if relation == "below":
        return ay0 > by1
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def _superlative(objects: Sequence[dict], idx: list[int], direction: str, image_size: int) -> list[int]:
    """The index of the extreme object among ``idx``, or [] when it is not clearly separated."""
    if len(idx) < 2:
        return list(idx)
    axis, sign = {"on the left": (0, 1), "on the right": (0, -1), "at the top": (1, 1), "at the bottom": (1, -1)}[
        direction
    ]
    order = sorted(idx, key=lambda i: sign * objects[i]["center"][axis])
    first, second = order[0], order[1]
    gap = abs(objects[first]["center"][axis] - objects[second]["center"][axis])
    return [first] if gap >= SUPERLATIVE_GAP * image_size else []


def evaluate(expr: Expression, objects: Sequence[dict], image_size: int) -> list[int]:
    """Indices of the objects that ``expr`` denotes (sorted). An ambiguous expression denotes []."""
    idx = [i for i, o in enumerate(objects) if expr.target.matches(o)]
    if expr.kind == "all":
        return idx
    if expr.kind == "simple":
        return idx if len(idx) == 1 else []
    if expr.kind == "superlative":
        if expr.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {expr.direction!r}; expected one of {DIRECTIONS}")
        return _superlative(objects, idx, expr.direction, image_size)
    if expr.kind == "relation":
        landmarks = [i for i, o in enumerate(objects) if expr.landmark.matches(o)]
        if len(landmarks) != 1:
            return []
        lm = landmarks[0]
        hits = [i for i in idx if i != lm and _side(objects[i]["bbox"], objects[lm]["bbox"], expr.relation)]
        return hits if len(hits) == 1 else []
    raise ValueError(f"unknown expression kind {expr.kind!r}")


def render(expr: Expression) -> str:
    """The sentence for ``expr`` (lower case, no final period)."""
    if expr.kind == "all":
        return f"all {expr.target.phrase(plural=True)}"
    head = f"the {expr.target.phrase()}"
    if expr.kind == "simple":
        return head
    if expr.kind == "superlative":
        return f"{head} {expr.direction}"
    if expr.kind == "relation":
        return f"{head} {expr.relation} the {expr.landmark.phrase()}"
    raise ValueError(f"unknown expression kind {expr.kind!r}")


def _descriptors_of(obj: dict, name_shape: bool = True) -> list[Descriptor]:
    """The descriptors the object satisfies: subsets of its attributes (always naming the shape
    when ``name_shape``; singular expressions always do, "all ..." may say "objects")."""
    shapes = (obj["shape"],) if name_shape else (None, obj["shape"])
    return [Descriptor(size, color, shape) for size, color, shape in
            itertools.product((None, obj["size"]), (None, obj["color"]), shapes)]


def unique_expressions(objects: Sequence[dict], target: int, image_size: int) -> list[Expression]:
    """Every expression of the grammar that denotes exactly ``[target]`` (deterministic order)."""
    out = []
    for d in _descriptors_of(objects[target]):
        candidates = [Expression("simple", d)]
        candidates += [Expression("superlative", d, direction=s) for s in DIRECTIONS]
        for j, lm_obj in enumerate(objects):
            if j == target:
                continue
            for lm in _descriptors_of(lm_obj):
                candidates += [Expression("relation", d, relation=r, landmark=lm) for r in RELATIONS]
        out += [e for e in candidates if evaluate(e, objects, image_size) == [target]]
    # the same sentence can arise from different landmarks' descriptors: keep the first
    seen, unique = set(), []
    for e in out:
        if render(e) not in seen:
            seen.add(render(e))
            unique.append(e)
    return unique


def minimal_expressions(objects: Sequence[dict], target: int, image_size: int) -> list[Expression]:
    """The unique expressions none of whose simplifications is still unique.

    These are the ones that NEED every word they use: e.g. "the small red triangle on the left"
    is minimal only when no shorter description picks the same object.
    """
    unique = unique_expressions(objects, target, image_size)
    keys = {render(e) for e in unique}
    minimal = []
    for e in unique:
        if e.kind == "relation" and any(
            render(Expression("relation", e.target, relation=e.relation, landmark=w)) in keys
            for w in e.landmark.weakenings()
            if w.shape
        ):
            continue  # a shorter landmark phrase also works
        if not any(render(s) in keys for s in e.simplifications()):
            minimal.append(e)
    return minimal


def plural_expressions(objects: Sequence[dict]) -> list[Expression]:
    """``all ...`` expressions with at least two targets (deterministic order)."""
    out, seen = [], set()
    for obj in objects:
        for d in _descriptors_of(obj, name_shape=False):
            if d.num_attributes == 0:
                continue
            expr = Expression("all", d)
            hits = evaluate(expr, objects, 1)
            key = render(expr)
            if len(hits) >= 2 and key not in seen:
                seen.add(key)
                out.append(expr)
    return out


def no_target_expressions(objects: Sequence[dict]) -> list[Expression]:
    """Plausible ``the S C N`` phrases that match no object: one attribute of a real object changed."""
    out, seen = [], set()
    for obj in objects:
        for key, values in (("size", SIZES), ("color", tuple(COLORS)), ("shape", SHAPES)):
            for v in values:
                if v == obj[key]:
                    continue
                d = dataclasses.replace(Descriptor(obj["size"], obj["color"], obj["shape"]), **{key: v})
                expr = Expression("simple", d)
                if render(expr) not in seen and not any(d.matches(o) for o in objects):
                    seen.add(render(expr))
                    out.append(expr)
    return out


def caption(objects: Sequence[dict]) -> str:
    """A one-sentence description listing the objects from left to right (:func:`join_phrases`)."""
    order = np.argsort([o["center"][0] for o in objects], kind="stable")
    parts = [f"a {objects[i]['size']} {objects[i]['color']} {objects[i]['shape']}" for i in order]
    listing = join_phrases(parts)
    return f"{listing[0].upper()}{listing[1:]} in front of a wall, standing on a tiled floor."
