"""The 8 symmetries of the square (flips and quarter turns): how they move an image, and its texts' side words.

`Symmetry` moves the pixels of a square image (data/transforms.py draws one per training visit; test-time
augmentation, tasks/base.py, averages over all 8); `map_sides` moves the words of a text that name a side or
direction, so that the text stays true of the moved image.

A caption or question that says where something is ("water on the left side", "a road at the top",
"the north-east corner", "a vertical runway") stays true of a flipped or rotated image only when its
side words move with the pixels: a left-right mirror swaps left and right, a counter-clockwise quarter
turn sends top -> left -> bottom -> right -> top. Imagery is taken as north-up, so north is the top.

Each side word names a direction (dx to the right, dy down, as displayed) and belongs to a family of
words for the same part of speech (top/bottom/left/right; upper/lower/left/right; north..., northern...,
northernmost..., northward(s)...; horizontal/vertical, which only swap under odd turns); it maps to the
word of its family for the moved direction. Corners keep the English order, the vertical word first:
"top left" under a quarter turn is "bottom left". Clockwise and counter-/anticlockwise swap under a mirror.

A side word used in a way that names no side of the image makes the text unmappable (`mappable` is
False), and a visit that reads such a text keeps the image unaugmented: "on top of" (above, not the
top), "the bottom of the river", "lower than", "is left" (the verb), "right angle", "right next to",
"right-hand", and above/below/beneath/underneath (in the image plane or in height: cannot tell).
Texts are mapped before tokenisation; a mapped text is its words, lower case, joined by spaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from spatialnet_dist.text import words as split_words


@dataclass(frozen=True)
class Symmetry:
    """One of the 8 symmetries of the square: `rotations` quarter turns counter-clockwise (as displayed,
    row 0 at the top), then, when `mirrored`, a left-right mirror. A vertical flip is mirror + 2 turns."""

    rotations: int = 0
    mirrored: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H, W) -> (..., H, W) of square images, (C, H, W) or a batch (B, C, H, W), moved; a new tensor
        or a view, never written to."""
        if self.rotations:
            x = torch.rot90(x, k=self.rotations, dims=(-2, -1))  # from the H axis towards W: top -> left
        return torch.flip(x, dims=(-1,)) if self.mirrored else x

    def move(self, dx: int, dy: int) -> tuple[int, int]:
        """Where a direction (dx to the right, dy down, as displayed) points in the moved image."""
        for _ in range(self.rotations):
            dx, dy = dy, -dx  # a counter-clockwise quarter turn: top -> left -> bottom -> right -> top
        return (-dx, dy) if self.mirrored else (dx, dy)


IDENTITY = Symmetry()
SYMMETRIES = tuple(Symmetry(k, m) for m in (False, True) for k in range(4))


def draw_symmetry(rng: np.random.Generator) -> Symmetry:
    """One of the 8 symmetries, uniformly."""
    return Symmetry(int(rng.integers(4)), bool(rng.integers(2)))


N, S, E, W = (0, -1), (0, 1), (1, 0), (-1, 0)
_COMPASS = {N: "north", S: "south", E: "east", W: "west",
            (1, -1): "northeast", (-1, -1): "northwest", (1, 1): "southeast", (-1, 1): "southwest"}
_CARDINAL = (N, S, E, W)
_FAMILIES: list[dict[tuple[int, int], str]] = [
    {N: "top", S: "bottom", W: "left", E: "right"},
    {N: "upper", S: "lower", W: "left", E: "right"},
    {N: "topmost", S: "bottommost", W: "leftmost", E: "rightmost"},
    {N: "uppermost", S: "lowermost", W: "leftmost", E: "rightmost"},
    _COMPASS,
    {d: w + "ern" for d, w in _COMPASS.items()},
    {d: _COMPASS[d] + "ernmost" for d in _CARDINAL},
    {d: _COMPASS[d] + "ward" for d in _CARDINAL},
    {d: _COMPASS[d] + "wards" for d in _CARDINAL},
]
# Axis words name a line, not a side: keyed by the line's direction with both signs folded to positive.
_AXES: list[dict[tuple[int, int], str]] = [
    {E: "horizontal", S: "vertical"},
    {E: "horizontally", S: "vertically"},
]
_MIRRORED = {"clockwise": "counterclockwise", "counterclockwise": "clockwise", "anticlockwise": "clockwise"}

# Words that show a side word is used for a place in the image, and words that show it is not.
_IMAGE_NOUNS = frozenset({"image", "picture", "photo", "photograph", "scene", "frame", "map", "tile", "view"})
_PLACES = frozenset({"part", "parts", "half", "side", "sides", "edge", "edges", "corner", "corners", "area",
                     "areas", "region", "regions", "portion", "section", "border", "end", "quarter", "third", "bank"})
_BEFORE_LEFT_RIGHT = frozenset({"the", "to", "on", "at", "far", "its", "their", "from", "and", "or"})
_ARTICLES = frozenset({"the", "a", "an", "this"})
_NEVER_MAPPABLE = frozenset({"above", "below", "beneath", "underneath"})


@dataclass(frozen=True)
class SideWord:
    """A word naming `direction` (dx right, dy down), and the words of its family for the other directions."""

    direction: tuple[int, int]
    family: dict[tuple[int, int], str]
    axis: bool  # horizontal/vertical: the direction's sign does not matter

    def moved(self, symmetry: Symmetry) -> tuple[int, int]:
        dx, dy = symmetry.move(*self.direction)
        return (abs(dx), abs(dy)) if self.axis else (dx, dy)

    def under(self, symmetry: Symmetry) -> str:
        return self.family[self.moved(symmetry)]


def _side_words() -> dict[str, SideWord]:
    out: dict[str, SideWord] = {}
    for families, axis in ((_FAMILIES, False), (_AXES, True)):
        for family in families:
            for direction, word in family.items():
                out.setdefault(word, SideWord(direction, family, axis))  # left/right: the top/bottom family
    return out


SIDE_WORDS = _side_words()


def _names_a_side(ws: list[str], i: int) -> bool:
    """Whether the side word ws[i] names a place in the image (see the module docstring); False: cannot tell."""
    word = ws[i]
    before = ws[i - 1] if i else ""
    after = ws[i + 1] if i + 1 < len(ws) else ""
    if word in ("top", "bottom"):
        if before == "on" or after in ("view", "down", "up"):
            return False
        if after == "of":
            rest = [w for w in ws[i + 2 :] if w not in _ARTICLES]
            return bool(rest) and rest[0] in _IMAGE_NOUNS
        return True
    if word in ("upper", "lower"):
        return after in _PLACES or after in SIDE_WORDS
    if word in ("left", "right"):
        if after in ("angle", "angles", "angled", "hand"):
            return False
        return (before in _BEFORE_LEFT_RIGHT or before in SIDE_WORDS or after in _PLACES or after in SIDE_WORDS
                or after in ("of", "and", "or"))
    return True


@lru_cache(maxsize=2**16)
def _parse(text: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """-> (words, indices of the side words), or None when a side word's use is unclear."""
    ws = split_words(text)
    sides = tuple(i for i, w in enumerate(ws) if w in SIDE_WORDS or w in _MIRRORED)
    if any(w in _NEVER_MAPPABLE for w in ws):
        return None
    if len(sides) < len(ws):  # a text of side words only ("left", "top right") is an answer naming a side
        if not all(_names_a_side(ws, i) for i in sides):
            return None
    return tuple(ws), sides


def mappable(text: str) -> bool:
    """Whether every side word of `text` names a place in the image, so that `map_sides` can map it."""
    return _parse(text) is not None


def map_sides(text: str, symmetry: Symmetry) -> str:
    """`text` as it reads of the image moved by `symmetry` (unchanged when it names no side or under the
    identity). Raises ValueError for a text that is not `mappable` under any other symmetry."""
    return text if symmetry == IDENTITY else _mapped(text, symmetry)


@lru_cache(maxsize=2**16)
def _mapped(text: str, symmetry: Symmetry) -> str:
    parsed = _parse(text)
    if parsed is None:
        raise ValueError(f"text names a side unclearly: {text!r}")
    ws, sides = parsed
    if not sides:
        return text
    out = list(ws)
    moved: dict[int, tuple[int, int]] = {}
    for i in sides:
        if ws[i] in _MIRRORED:
            out[i] = _MIRRORED[ws[i]] if symmetry.mirrored else ws[i]
            continue
        side = SIDE_WORDS[ws[i]]
        out[i] = side.under(symmetry)
        if not side.axis and side.direction in _CARDINAL:
            moved[i] = side.moved(symmetry)
    for i in sides:  # corners: "left bottom" -> "bottom left", "east north" -> "north east"
        if i in moved and i + 1 in moved and moved[i][1] == 0 and moved[i + 1][0] == 0:
            out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)
