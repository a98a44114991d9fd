"""The canvas every synthetic picture is drawn on: ground colours first (numpy), then markings and objects
(PIL calls replayed in order by `render`), then exposure jitter and camera grain.

The scene elements (roads.py, water.py, buildings.py, trees.py, cars.py) draw onto a `Scene` and keep its
truth: `surface` says what every pixel is, `taken` which pixels an object (or its shadow) holds, `counts`
how many of each countable object fitted, `has` which surfaces were laid, and `shown` which TAGS the picture
shows (the sample's multi-label tags).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256
OBJECTS = ("building", "car", "tree")  # counted; meta["counts"]
SURFACES = ("road", "water")  # present or not; meta["surfaces"]
# What a picture may show, as the sample's tags: the counted objects and surfaces, crop fields, the sandy
# beach of a lake or coast, dirt tracks and paths, and parking lots (their marked stalls).
TAGS = ("beach", "building", "car", "field", "parking-lot", "road", "track", "tree", "water")

GROUND, ASPHALT, WATER = 0, 1, 2  # what a pixel is: buildings and trees stand on ground, cars on asphalt
SHADOW = (38, 42, 34)
MARKING = (222, 222, 212)  # road and parking-stall paint
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)  # (H, W) pixel coordinates for stripes
_GRAIN = np.random.default_rng(0).standard_normal((SIZE, SIZE, 3), dtype=np.float32)  # (H, W, 3) sensor noise


def pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def shape_mask(draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """(H, W) bool mask of whatever `draw` paints on a blank canvas."""
    img = Image.new("L", (SIZE, SIZE))
    draw(ImageDraw.Draw(img))
    return np.asarray(img) > 0


def band(axis: str, lo: int, hi: int) -> np.ndarray:
    """(H, W) mask of a full-length band: rows lo..hi-1 ("h") or columns lo..hi-1 ("v")."""
    mask = np.zeros((SIZE, SIZE), bool)
    if axis == "h":
        mask[max(lo, 0) : hi, :] = True
    else:
        mask[:, max(lo, 0) : hi] = True
    return mask


class Scene:
    """A picture being drawn (see the module docstring). Objects are placed only where they fit whole, so
    `counts` is exactly what the picture shows."""

    def __init__(self, rng: np.random.Generator, textured: bool = True):
        self.rng = rng
        # textured=False skips the ground's textures (half the drawing time): for scenes whose geometry alone
        # is wanted (question calibration); placement never reads colours, so the geometry is drawn alike.
        self.textured = textured
        self.rgb = np.zeros((SIZE, SIZE, 3), np.float32)  # (H, W, 3) ground colours
        self.surface = np.full((SIZE, SIZE), GROUND, np.uint8)
        self.taken = np.zeros((SIZE, SIZE), bool)
        self.ops: list[tuple] = []  # PIL calls (method, xy, kwargs) drawn in order over the ground
        self.counts = dict.fromkeys(OBJECTS, 0)
        self.has = dict.fromkeys(SURFACES, False)
        self.shown: set[str] = set()  # TAGS of what was drawn
        self.footprint = {k: np.zeros((SIZE, SIZE), bool) for k in ("building", "tree", "road")}  # (H, W) each
        self.facts: dict = {}  # what captions may say beyond counts: roof colour, field colours, ... (meta["facts"])

    def show(self, tag: str) -> None:
        """Record that the picture shows `tag` (one of TAGS)."""
        if tag not in TAGS:
            raise ValueError(f"synthetic scene: unknown tag {tag!r} (TAGS: {', '.join(TAGS)})")
        self.shown.add(tag)

    # ---- ground ----

    def colour(self, rgb, amount: float = 12) -> np.ndarray:
        return np.clip(np.asarray(rgb, np.float32) + self.rng.uniform(-amount, amount, 3), 0, 255)

    def noise(self, cells: int, box: tuple[int, int, int, int] = (0, 0, SIZE, SIZE)) -> np.ndarray:
        """(h, w) smooth noise of about unit variance with `cells` blobs across the image, inside box (x0, y0, x1, y1)."""
        small = self.rng.standard_normal((cells, cells), dtype=np.float32)
        x0, y0, x1, y1 = box
        k = cells / SIZE
        return np.asarray(
            Image.fromarray(small).resize((x1 - x0, y1 - y0), Image.BICUBIC, box=(x0 * k, y0 * k, x1 * k, y1 * k))
        )

    def paint(self, mask, rgb, blotch: float = 0.1, cells: int = 6, fine: float = 0.04, shade=None) -> None:
        """Fill `mask` (None: everything) with a colour mottled by coarse and fine noise, times `shade` (H, W)."""
        if not self.textured:
            return
        if mask is None:
            x0, y0, x1, y1 = 0, 0, SIZE, SIZE
        else:  # work inside the mask's bounding box only: roads and ponds are small
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if not rows.size:
                return
            x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        box = (x0, y0, x1, y1)
        light = 1 + blotch * self.noise(cells, box) + fine * self.noise(40, box)  # (h, w)
        if shade is not None:
            light *= shade[y0:y1, x0:x1]
        texture = light[..., None] * self.colour(rgb)  # (h, w, 3)
        if mask is None:
            self.rgb[:] = texture
        else:
            region = self.rgb[y0:y1, x0:x1]
            region[:] = np.where(mask[y0:y1, x0:x1, None], texture, region)

    def stripes(self, mask, rgb, angle: float, period: float, depth: float) -> None:
        """Parallel crop rows: every other half-period darker by `depth`."""
        a = math.radians(angle)
        phase = (_XX * math.cos(a) + _YY * math.sin(a)) / period
        self.paint(mask, rgb, blotch=0.06, shade=1 - depth * ((phase % 1) < 0.5))

    # ---- placing objects ----

    def fits(self, x: int, y: int, w: int, h: int, surface: int, margin: int) -> bool:
        """Whether a w x h object at (x, y) lies whole on `surface`, `margin` px clear of the frame and of others."""
        if x < margin or y < margin or x + w + margin > SIZE or y + h + margin > SIZE:
            return False
        return (
            bool((self.surface[y : y + h, x : x + w] == surface).all())
            and not self.taken[y - margin : y + h + margin, x - margin : x + w + margin].any()
        )

    def scatter(self, n: int, put: Callable[[], bool], tries_each: int = 30) -> None:
        """Call `put` (one random placement attempt) until n objects fitted or the tries are spent."""
        placed = 0
        for _ in range(n * tries_each):
            if placed >= n:
                return
            placed += put()

    def mask(self, kind: str) -> np.ndarray:
        """(H, W) bool: where `kind` (building, tree, road or water) is in the picture."""
        return self.surface == WATER if kind == "water" else self.footprint[kind]

    # ---- finishing ----

    def render(self) -> np.ndarray:
        """-> (H, W, 3) uint8: the ground, the drawn objects, exposure jitter and sensor grain."""
        img = Image.fromarray(self.rgb.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for method, xy, kwargs in self.ops:
            getattr(draw, method)(xy, **kwargs)
        rgb = np.asarray(img, np.float32) * self.rng.uniform(0.9, 1.1) + self.rng.uniform(-8, 8, 3).astype(np.float32)
        # Grain: a fixed noise tile at a random offset; drawing fresh noise per pixel would dominate the cost.
        shift = self.rng.integers(0, SIZE, 2)
        rgb += self.rng.uniform(0.5, 2) * np.roll(_GRAIN, (int(shift[0]), int(shift[1])), axis=(0, 1))
        return rgb.clip(0, 255).astype(np.uint8)
