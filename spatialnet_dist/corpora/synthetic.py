"""The synthetic demo corpus `synthetic`: procedural 256x256 aerial-like scenes whose labels, captions and
question/answer pairs are true of the picture.

Each image is one of eight land-use scenes (CLASSES) drawn from textured ground, roads, water and countable
objects: buildings, cars and trees that never overlap and always lie whole inside the frame, so the number the
drawing placed is the number a viewer can count. Those counts and the masks of what was drawn (kept in `meta`)
are the ground truth for the five captions and the questions (corpora/synthetic_qa.py): RSVQA-LR's presence,
count, comp and rural_urban, and `position` ("is there a road in the top part of the image?"). Questions are
kept so that every question text's answers are balanced (yes/no ~50/50, counts spread over the RSVQA-LR bins
0 / 1-10 / 11-100): neither the type's majority answer nor the text alone tells the answer; the picture does.

Captions (corpora/synthetic_captions.py) state facts of the picture that vary within its class (how many
houses, roof and field colours, how full a parking lot is, where a road or water lies), so that a model must
read the picture to match them; one caption per class cannot.

Deterministic for a seed: image i depends only on (seed, i). Classes are balanced (each block of 8 images holds
every class once) and splits are 80/10/10 (each block of 10 images holds 8 train, 1 val, 1 test). Captions
and position questions may name sides (left, top, ...) in words that data/sides.py maps under flips and
rotations, so an augmentation that moves the pixels maps their words along.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from spatialnet_dist.corpora import synthetic_captions as cap
from spatialnet_dist.corpora import synthetic_qa as qa
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.manifest import read_manifest
from spatialnet_dist.store.schema import Sample
from spatialnet_dist.store.writer import ShardWriter

CORPUS = "synthetic"
SIZE = 256
CLASSES = ["agricultural", "forest", "residential", "industrial", "water", "highway", "parkinglot", "meadow"]
URBAN_SCENES = frozenset({"residential", "industrial", "highway", "parkinglot"})  # rural_urban answer "urban"
OBJECTS = ("building", "car", "tree")  # counted; meta["counts"]
SURFACES = ("road", "water")  # present or not; meta["surfaces"]
SPLIT_PATTERN = ("train",) * 8 + ("val", "test")
CALIBRATION_IMAGES = 800  # scenes that set how often each question is kept (synthetic_qa.acceptance)

_GROUND, _ASPHALT, _WATER = 0, 1, 2  # what a pixel is: buildings and trees stand on ground, cars on asphalt
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)  # (H, W) pixel coordinates for stripes
_GRAIN = np.random.default_rng(0).standard_normal((SIZE, SIZE, 3), dtype=np.float32)  # (H, W, 3) sensor noise

_SHADOW = (38, 42, 34)
_MARKING = (222, 222, 212)
_ROOFS = {
    "red": (172, 68, 52),
    "brown": (128, 88, 62),
    "grey": (132, 132, 138),
    "white": (222, 222, 216),
    "blue": (74, 104, 160),
}
_CAR_COLOURS = ((235, 235, 235), (190, 190, 198), (200, 40, 40), (40, 80, 190), (225, 200, 40), (40, 140, 150))
_GROUNDS = {"green": (100, 132, 64), "dry": (150, 148, 96)}  # highway verges
_MEDIANS = {"grass": (92, 128, 60), "concrete": (160, 158, 150)}
_CROWNS = {"green": (58, 112, 48), "dark green": (40, 88, 38), "light green": (104, 146, 58), "brown": (128, 92, 50)}
_GRASSES = {"light green": (136, 166, 78), "dry yellow": (184, 172, 104)}  # meadows
_LOT_SHARES = ((0.08, 0.22), (0.38, 0.52), (0.7, 0.88))  # mostly empty, half full, nearly full (see captions)
_FIELDS = {"green": (82, 140, 55), "yellow": (204, 182, 96), "brown": (138, 102, 66), "light green": (142, 178, 86)}


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _shape_mask(draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """(H, W) bool mask of whatever `draw` paints on a blank canvas."""
    img = Image.new("L", (SIZE, SIZE))
    draw(ImageDraw.Draw(img))
    return np.asarray(img) > 0


def _band(axis: str, lo: int, hi: int) -> np.ndarray:
    """(H, W) mask of a full-length band: rows lo..hi-1 ("h") or columns lo..hi-1 ("v")."""
    mask = np.zeros((SIZE, SIZE), bool)
    if axis == "h":
        mask[max(lo, 0) : hi, :] = True
    else:
        mask[:, max(lo, 0) : hi] = True
    return mask


class _Scene:
    """A picture being drawn: ground colours first (numpy), then markings and objects (PIL), then camera noise.

    `surface` says what every pixel is and `taken` which pixels an object (or its shadow) holds; objects are
    placed only where they fit whole, so `counts` is exactly what the picture shows.
    """

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.rgb = np.zeros((SIZE, SIZE, 3), np.float32)  # (H, W, 3) ground colours
        self.surface = np.full((SIZE, SIZE), _GROUND, np.uint8)
        self.taken = np.zeros((SIZE, SIZE), bool)
        self.ops: list[tuple] = []  # PIL calls (method, xy, kwargs) drawn in order over the ground
        self.counts = dict.fromkeys(OBJECTS, 0)
        self.has = dict.fromkeys(SURFACES, False)
        self.footprint = {k: np.zeros((SIZE, SIZE), bool) for k in ("building", "tree", "road")}  # (H, W) each
        self.facts: dict = {}  # what captions may say beyond counts: roof colour, field colours, ... (meta["facts"])

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

    def road(self, axis: str, centre: int, width: int, rgb=(98, 98, 102), dashes: bool = True) -> bool:
        """A straight road across the image; refused (False) where it would cross water."""
        lo = int(centre) - width // 2
        mask = _band(axis, lo, lo + width)
        if (self.surface[mask] == _WATER).any():
            return False
        self.paint(mask, rgb, blotch=0.05)
        self.surface[mask] = _ASPHALT
        self.footprint["road"] |= mask
        self.has["road"] = True
        if dashes:
            start = int(self.rng.integers(0, 16))
            for t in range(start, SIZE, 18):
                xy = (t, centre, t + 8, centre) if axis == "h" else (centre, t, centre, t + 8)
                self.ops.append(("line", xy, {"fill": _MARKING, "width": 1}))
        return True

    def water(self, mask, beach_mask=None) -> None:
        """Blue water with ripples, optionally inside a sandy beach; objects never stand on water."""
        if beach_mask is not None:
            self.paint(beach_mask & (self.surface == _GROUND), (214, 198, 150), blotch=0.05)
        rgb = _pick(self.rng, ((42, 84, 132), (38, 100, 140), (50, 78, 112)))
        self.paint(mask, rgb, blotch=0.12, cells=5, fine=0.06)
        self.surface[mask] = _WATER
        self.has["water"] = True

    def blob(self, cx: float, cy: float, radius: float, wobble: float = 0.25) -> list[tuple[float, float]]:
        """Polygon of a smooth irregular blob (lake, pond): a circle whose radius varies by low harmonics."""
        theta = np.linspace(0, 2 * np.pi, 36, endpoint=False)
        r = np.full_like(theta, radius)
        for k in (2, 3, 4):
            r += radius * wobble / k * self.rng.uniform(0.3, 1) * np.cos(k * theta + self.rng.uniform(0, 2 * np.pi))
        return list(zip((cx + r * np.cos(theta)).tolist(), (cy + r * np.sin(theta)).tolist()))

    def pond(self) -> bool:
        """A small pond on free ground somewhere, if one fits."""
        for _ in range(10):
            r = float(self.rng.uniform(16, 28))
            cx, cy = self.rng.uniform(r + 8, SIZE - r - 8, 2)
            poly = self.blob(cx, cy, r)
            mask = _shape_mask(lambda d, poly=poly: d.polygon(poly, fill=1))
            if (self.surface[mask] == _GROUND).all() and not self.taken[mask].any():
                self.water(mask)
                self.taken[mask] = True
                return True
        return False

    # ---- objects: each returns whether it fitted; only what fitted is drawn and counted ----

    def fits(self, x: int, y: int, w: int, h: int, surface: int, margin: int) -> bool:
        if x < margin or y < margin or x + w + margin > SIZE or y + h + margin > SIZE:
            return False
        return (
            bool((self.surface[y : y + h, x : x + w] == surface).all())
            and not self.taken[y - margin : y + h + margin, x - margin : x + w + margin].any()
        )

    def building(self, x, y, w, h, roof, hall: bool = False, margin: int = 2) -> bool:
        x, y, w, h = int(x), int(y), int(w), int(h)
        s = 4 if hall else 3  # shadow offset: taller halls cast longer shadows
        if not self.fits(x, y, w + s, h + s, _GROUND, margin):
            return False
        self.taken[y : y + h + s, x : x + w + s] = True
        self.footprint["building"][y : y + h, x : x + w] = True
        fill = tuple(int(c) for c in self.colour(roof, 10))
        dark = tuple(int(c * 0.78) for c in fill)
        self.ops.append(("rectangle", (x + s, y + s, x + w + s - 1, y + h + s - 1), {"fill": _SHADOW}))
        self.ops.append(("rectangle", (x, y, x + w - 1, y + h - 1), {"fill": fill}))
        if hall:  # a flat roof with parallel seams
            step = int(self.rng.integers(6, 10))
            for t in range(step, (w if w >= h else h) - 2, step):
                xy = (x + t, y + 1, x + t, y + h - 2) if w >= h else (x + 1, y + t, x + w - 2, y + t)
                self.ops.append(("line", xy, {"fill": dark, "width": 1}))
        else:  # a pitched roof: the ridge along the long side, one slope darker
            if w >= h:
                self.ops.append(("rectangle", (x, y + h // 2, x + w - 1, y + h - 1), {"fill": dark}))
            else:
                self.ops.append(("rectangle", (x + w // 2, y, x + w - 1, y + h - 1), {"fill": dark}))
        self.counts["building"] += 1
        return True

    def tree(self, x, y, r, crown: str = "green", margin: int = 1) -> bool:
        x, y, r = int(x), int(y), int(r)
        d = 2 * r + 1
        if not self.fits(x, y, d + 2, d + 2, _GROUND, margin):
            return False
        self.taken[y : y + d + 2, x : x + d + 2] = True
        self.footprint["tree"][y : y + d, x : x + d] = True  # the crown's box
        crown = self.colour(_CROWNS[crown], 14)
        light = tuple(int(min(255, c * 1.3)) for c in crown)
        k = r // 3
        self.ops.append(("ellipse", (x + 2, y + 2, x + d + 1, y + d + 1), {"fill": _SHADOW}))
        self.ops.append(("ellipse", (x, y, x + d - 1, y + d - 1), {"fill": tuple(int(c) for c in crown)}))
        self.ops.append(("ellipse", (x + k, y + k, x + k + r, y + k + r), {"fill": light}))
        self.counts["tree"] += 1
        return True

    def car(self, x, y, horizontal: bool, margin: int = 1) -> bool:
        x, y = int(x), int(y)
        w, h = (13, 7) if horizontal else (7, 13)
        if not self.fits(x, y, w, h, _ASPHALT, margin):
            return False
        self.taken[y : y + h, x : x + w] = True
        body = _pick(self.rng, _CAR_COLOURS)
        glass = (x + 8, y + 1, x + 10, y + 5) if horizontal else (x + 1, y + 8, x + 5, y + 10)
        self.ops.append(("rectangle", (x, y, x + w - 1, y + h - 1), {"fill": body}))
        self.ops.append(("rectangle", glass, {"fill": (45, 50, 60)}))
        self.counts["car"] += 1
        return True

    def scatter(self, n: int, put: Callable[[], bool], tries_each: int = 30) -> None:
        """Call `put` (one random placement attempt) until n objects fitted or the tries are spent."""
        placed = 0
        for _ in range(n * tries_each):
            if placed >= n:
                return
            placed += put()

    def trees(self, n: int, r=(5, 9), crown: str = "green") -> None:
        rng = self.rng
        self.scatter(n, lambda: self.tree(*rng.integers(0, SIZE, 2), rng.integers(*r), crown=crown))

    def houses(self, n: int, roof, size=(13, 22)) -> None:
        rng = self.rng
        self.scatter(n, lambda: self.building(*rng.integers(0, SIZE, 2), *rng.integers(*size, 2), roof))

    def cars_on_road(self, n: int, axis: str, lo: int, hi: int) -> None:
        """Cars driving along a road band lo..hi-1 (rows for "h", columns for "v")."""
        rng = self.rng

        def put() -> bool:
            along, across = int(rng.integers(0, SIZE)), int(rng.integers(lo, hi - 7))
            return self.car(along, across, True) if axis == "h" else self.car(across, along, False)

        self.scatter(n, put)

    def parking(self, x0: int, y0: int, w: int, h: int, axis: str) -> None:
        """An asphalt lot with rows of marked stalls, a share of them taken at random (facts "stalls", "parked"):
        a share from one of _LOT_SHARES, so that how full the lot is can be told, and at most 100 cars (the
        count questions' bins stop there)."""
        mask = np.zeros((SIZE, SIZE), bool)
        mask[y0 : y0 + h, x0 : x0 + w] = True
        self.paint(mask, (84, 84, 88), blotch=0.05)
        self.surface[mask] = _ASPHALT
        # Stall grid in lot coordinates (u along a row, v across rows): a row, an aisle, two rows back to back, ...
        stall_w, stall_d, aisle = 11, 17, 14
        extent_u, extent_v = (w, h) if axis == "h" else (h, w)
        rows, v = [], 3
        while v + stall_d <= extent_v - 3:
            rows.append(v)
            v += stall_d + (aisle if len(rows) % 2 == 1 else 1)
        per_row = (extent_u - 6) // stall_w
        to_xy = (lambda u, v: (x0 + u, y0 + v)) if axis == "h" else (lambda u, v: (x0 + v, y0 + u))
        slots = []
        for v in rows:
            for j in range(per_row + 1):
                a, b = to_xy(3 + j * stall_w, v), to_xy(3 + j * stall_w, v + stall_d - 1)
                self.ops.append(("line", (*a, *b), {"fill": _MARKING, "width": 1}))
            slots += [to_xy(3 + j * stall_w + 2, v + 2) for j in range(per_row)]
        cars = min(round(self.rng.uniform(*_pick(self.rng, _LOT_SHARES)) * len(slots)), 100)
        parked = sum(self.car(*slots[k], horizontal=axis == "v", margin=0) for k in self.rng.permutation(len(slots))[:cars])
        self.facts.update(stalls=len(slots), parked=parked)

    def mask(self, kind: str) -> np.ndarray:
        """(H, W) bool: where `kind` (building, tree, road or water) is in the picture."""
        return self.surface == _WATER if kind == "water" else self.footprint[kind]

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


# ---- one drawing per land-use class ----


def _agricultural(s: _Scene) -> None:
    rng = s.rng
    # 2-4 rectangular parcels: one cut across the image, each side maybe cut again the other way
    cut = int(rng.integers(80, 177))
    parcels, tracks = [], [(cut, 0, cut, SIZE)]
    for x0, x1 in ((0, cut), (cut, SIZE)):
        if rng.random() < 0.6:
            c2 = int(rng.integers(70, 187))
            parcels += [(x0, 0, x1, c2), (x0, c2, x1, SIZE)]
            tracks.append((x0, c2, x1, c2))
        else:
            parcels.append((x0, 0, x1, SIZE))
    transpose = rng.random() < 0.5
    if transpose:
        parcels = [(y0, x0, y1, x1) for x0, y0, x1, y1 in parcels]
        tracks = [(y0, x0, y1, x1) for x0, y0, x1, y1 in tracks]
    colours = []
    for x0, y0, x1, y1 in parcels:
        name = _pick(rng, list(_FIELDS))
        colours.append(name)
        mask = np.zeros((SIZE, SIZE), bool)
        mask[y0:y1, x0:x1] = True
        s.stripes(mask, _FIELDS[name], _pick(rng, (0, 45, 90, 135)), rng.uniform(6, 12), rng.uniform(0.12, 0.22))
    if rng.random() < 0.4:  # a country road along the main cut instead of a dirt track
        s.road("h" if transpose else "v", cut, int(rng.integers(8, 11)), rgb=(122, 118, 108), dashes=False)
        tracks = tracks[1:]
    for xy in tracks:
        s.ops.append(("line", xy, {"fill": (150, 122, 88), "width": 3}))
    s.taken |= _shape_mask(lambda d: [d.line(xy, fill=1, width=5) for xy in tracks])  # nothing stands on a track
    if rng.random() < 0.15:
        s.pond()
    roof = _pick(rng, ("red", "brown", "grey"))
    if rng.random() < 0.45:
        s.houses(int(rng.integers(1, 4)), _ROOFS[roof], size=(14, 26))
    s.trees(int(rng.integers(0, 11)))
    s.facts.update(roof=roof, fields=sorted(set(colours)), parcels=len(parcels))


def _forest(s: _Scene) -> None:
    rng = s.rng
    s.paint(None, (50, 68, 38), blotch=0.25, cells=10, fine=0.1)
    if rng.random() < 0.35:  # a dirt road through the woods, first so that the trees and the pond keep off it
        s.road(_pick(rng, ("h", "v")), int(rng.integers(20, 236)), int(rng.integers(8, 12)), rgb=(112, 100, 80), dashes=False)
    if rng.random() < 0.25:
        s.pond()
    crown = _pick(rng, ("dark green", "light green", "brown"))
    # sparse or dense, well apart (synthetic_captions.DENSE_FOREST lies between), so that captions can tell
    s.trees(int(rng.integers(44, 64)) if rng.random() < 0.5 else int(rng.integers(14, 27)), r=(7, 12), crown=crown)
    s.facts.update(crown=crown)


def _residential(s: _Scene) -> None:
    rng = s.rng
    s.paint(None, (96, 130, 62), blotch=0.12)
    width = int(rng.integers(10, 15))
    roads = []
    for axis in ("h", "v"):
        first = int(rng.integers(40, 110))
        roads.append((axis, first))
        if rng.random() < 0.6:
            roads.append((axis, min(first + int(rng.integers(80, 120)), SIZE - 30)))
    for axis, centre in roads:
        s.road(axis, centre, width)
    roof = _pick(rng, ("red", "brown", "grey"))
    # Candidate lots line both sides of every street; a random subset of them gets a house.
    lots = []
    for axis, centre in roads:
        for side in (-1, 1):
            t = int(rng.integers(0, 10))
            while t < SIZE:
                w, h = (int(v) for v in rng.integers(13, 22, 2))
                setback = int(rng.integers(3, 7))
                across = centre + side * (width // 2 + setback) - (h if side < 0 else 0)
                lots.append((t, across, w, h) if axis == "h" else (across, t, h, w))
                t += w + int(rng.integers(3, 12))
    target = int(rng.integers(8, 41))
    for k in rng.permutation(len(lots)):
        if s.counts["building"] >= target:
            break
        s.building(*lots[k], _ROOFS[roof])
    s.houses(target - s.counts["building"], _ROOFS[roof])
    for axis, centre in roads:
        s.cars_on_road(int(rng.integers(0, 5)), axis, centre - width // 2, centre + width // 2)
    s.trees(int(rng.integers(0, 13)), r=(5, 8))
    s.facts.update(roof=roof, streets=len(roads))


def _industrial(s: _Scene) -> None:
    rng = s.rng
    s.paint(None, (168, 162, 150), blotch=0.07, cells=8)
    axis = _pick(rng, ("h", "v"))
    centre = int(_pick(rng, (rng.integers(18, 40), rng.integers(216, 238))))
    width = int(rng.integers(14, 19))
    s.road(axis, centre, width)
    # the parking area sits on the road's half of the image, the halls fill the rest
    lot_w, lot_h = int(rng.integers(70, 130)), int(rng.integers(50, 90))
    along = int(rng.integers(0, SIZE - lot_w))
    near = centre + width // 2 + 3 if centre < SIZE // 2 else centre - width // 2 - 3 - lot_h
    x0, y0 = (along, near) if axis == "h" else (near, along)
    w, h = (lot_w, lot_h) if axis == "h" else (lot_h, lot_w)
    s.parking(x0, y0, w, h, "h" if axis == "h" else "v")
    roof = _pick(rng, ("white", "grey", "blue"))
    target, scale = int(rng.integers(2, 7)), 1.0
    for attempt in range(200):
        if s.counts["building"] >= target:
            break
        scale = max(0.45, scale * (0.97 if attempt % 10 == 9 else 1))  # shrink the halls when they do not fit
        w, h = int(rng.integers(36, 92) * scale), int(rng.integers(30, 80) * scale)
        s.building(*rng.integers(0, SIZE, 2), w, h, _ROOFS[roof], hall=True, margin=4)
    s.cars_on_road(int(rng.integers(0, 4)), axis, centre - width // 2, centre + width // 2)
    s.trees(int(rng.integers(0, 6)), r=(5, 8))
    s.facts.update(roof=roof)


def _water(s: _Scene) -> None:
    rng = s.rng
    s.paint(None, (98, 134, 64), blotch=0.12)
    beach = int(rng.integers(5, 14))
    if rng.random() < 0.5:  # a lake
        cx, cy = rng.uniform(96, 160, 2)
        radius = float(rng.uniform(55, 85))
        lake = s.blob(cx, cy, radius)
        shore = [
            (cx + (x - cx) * (radius + beach) / radius, cy + (y - cy) * (radius + beach) / radius) for x, y in lake
        ]
        water = _shape_mask(lambda d: d.polygon(lake, fill=1))
        sand = _shape_mask(lambda d: d.polygon(shore, fill=1))
        s.facts["water"] = "lake"
    else:  # a coast: the sea covers one side up to a wavy shoreline
        depth = rng.uniform(80, 140)
        t = np.linspace(0, SIZE, 33)
        line = depth + 14 * np.sin(t / SIZE * rng.uniform(2, 6) + rng.uniform(0, 6)) + rng.normal(0, 3, t.shape)
        water = _shape_mask(lambda d: d.polygon([(0, 0), *zip(t.tolist(), line.tolist()), (SIZE, 0)], fill=1))
        sand = _shape_mask(lambda d: d.polygon([(0, 0), *zip(t.tolist(), (line + beach).tolist()), (SIZE, 0)], fill=1))
        k = int(rng.integers(4))  # which side the sea is on
        water, sand = np.rot90(water, k).copy(), np.rot90(sand, k).copy()
        s.facts["water"] = "sea"
    s.water(water, beach_mask=sand)
    s.taken |= sand & ~water  # keep the beach clear
    if rng.random() < 0.3:
        s.road(_pick(rng, ("h", "v")), int(rng.integers(20, 236)), int(rng.integers(8, 12)), dashes=False)
    roof = _pick(rng, ("red", "brown", "white"))
    if rng.random() < 0.4:
        s.houses(int(rng.integers(1, 4)), _ROOFS[roof])
    s.trees(int(rng.integers(0, 13)))
    s.facts.update(roof=roof)


def _highway(s: _Scene) -> None:
    rng = s.rng
    ground = _pick(rng, list(_GROUNDS))
    s.paint(None, _GROUNDS[ground], blotch=0.12)
    axis = _pick(rng, ("h", "v"))
    lane, median = int(rng.integers(12, 16)), int(rng.integers(6, 13))
    top = int(rng.integers(70, 186 - 4 * lane - median))
    carriageways = [(top, top + 2 * lane), (top + 2 * lane + median, top + 4 * lane + median)]
    for lo, hi in carriageways:
        s.road(axis, (lo + hi) // 2, hi - lo, rgb=(78, 78, 84))
        for edge in (lo + 1, hi - 2):  # solid edge lines
            xy = (0, edge, SIZE, edge) if axis == "h" else (edge, 0, edge, SIZE)
            s.ops.append(("line", xy, {"fill": _MARKING, "width": 1}))
    strip = _band(axis, carriageways[0][1], carriageways[1][0])
    median_kind = _pick(rng, list(_MEDIANS))
    s.paint(strip, _MEDIANS[median_kind], blotch=0.05)
    s.taken |= strip
    cars = int(rng.integers(3, 26))
    for i, (lo, hi) in enumerate(carriageways):
        s.cars_on_road(cars // 2 + (i == 0) * (cars % 2), axis, lo + 3, hi - 3)
    roof = None
    if rng.random() < 0.35:
        roof = _pick(rng, ("red", "grey", "brown"))
        s.houses(int(rng.integers(1, 4)), _ROOFS[roof])
    s.trees(int(rng.integers(0, 16)))
    s.facts.update(ground=ground, median=median_kind, axis=axis, roof=roof)


def _parkinglot(s: _Scene) -> None:
    rng = s.rng
    s.paint(None, (100, 132, 66), blotch=0.12)
    axis = _pick(rng, ("h", "v"))
    road_w = int(rng.integers(12, 17))
    road_at = int(_pick(rng, (rng.integers(10, 20), rng.integers(236, 246))))
    s.road(axis, road_at, road_w)
    m = [int(v) for v in rng.integers(10, 32, 4)]  # grass margins around the lot
    x0, y0, x1, y1 = m[0], m[1], SIZE - m[2], SIZE - m[3]
    if axis == "h":
        y0, y1 = (max(y0, road_at + road_w // 2 + 4), y1) if road_at < 128 else (y0, min(y1, road_at - road_w // 2 - 4))
    else:
        x0, x1 = (max(x0, road_at + road_w // 2 + 4), x1) if road_at < 128 else (x0, min(x1, road_at - road_w // 2 - 4))
    s.parking(x0, y0, x1 - x0, y1 - y0, _pick(rng, ("h", "v")))
    s.trees(int(rng.integers(0, 9)), r=(4, 7))
    if rng.random() < 0.25:
        s.houses(1, _ROOFS["grey"], size=(13, 18))
    s.facts.update(roof="grey")


def _meadow(s: _Scene) -> None:
    rng = s.rng
    grass = _pick(rng, list(_GRASSES))
    s.paint(None, _GRASSES[grass], blotch=0.16, cells=5, fine=0.08)
    if rng.random() < 0.5:  # a winding dirt path (not a road), first so that the pond keeps clear of it
        path = [(SIZE * k / 3, float(rng.uniform(0, SIZE))) for k in range(4)]
        if rng.random() < 0.5:
            path = [(y, x) for x, y in path]
        s.ops.append(("line", path, {"fill": (160, 138, 100), "width": int(rng.integers(3, 6)), "joint": "curve"}))
        s.taken |= _shape_mask(lambda d: d.line(path, fill=1, width=8))
        s.facts["path"] = True
    if rng.random() < 0.25:
        s.pond()
    if rng.random() < 0.25:
        centre, width = int(rng.integers(30, 226)), int(rng.integers(8, 11))
        s.road(_pick(rng, ("h", "v")), centre, width, rgb=(124, 120, 110), dashes=False)
    roof = _pick(rng, ("red", "brown", "grey"))
    if rng.random() < 0.4:
        s.houses(int(rng.integers(1, 4)), _ROOFS[roof], size=(14, 24))
    s.trees(int(rng.integers(3, 15)))
    s.facts.update(roof=roof, grass=grass)


_DRAW = {
    "agricultural": _agricultural,
    "forest": _forest,
    "residential": _residential,
    "industrial": _industrial,
    "water": _water,
    "highway": _highway,
    "parkinglot": _parkinglot,
    "meadow": _meadow,
}


# ---- the corpus ----


def scene_of(index: int, seed: int) -> str:
    """Class of image `index`: each block of 8 images holds every class once, in a seeded order."""
    order = np.random.default_rng([seed, index // len(CLASSES), 1]).permutation(len(CLASSES))
    return CLASSES[int(order[index % len(CLASSES)])]


def split_of(index: int, seed: int) -> str:
    """Split of image `index`: each block of 10 images holds 8 train, 1 val, 1 test, in a seeded order."""
    order = np.random.default_rng([seed, index // len(SPLIT_PATTERN), 2]).permutation(len(SPLIT_PATTERN))
    return SPLIT_PATTERN[int(order[index % len(SPLIT_PATTERN)])]


def _candidates(rng: np.random.Generator, scene: str, s: _Scene) -> list[qa.Candidate]:
    """The image's shortlisted question candidates (synthetic_qa.shortlist), answers not yet balanced."""
    masks = {kind: s.mask(kind) for kind in qa.POSITION_MIN_PIXELS}
    return qa.shortlist(rng, qa.candidates(scene in URBAN_SCENES, s.counts, s.has, masks))


@functools.cache
def _acceptance() -> dict[tuple, float]:
    """synthetic_qa.acceptance over CALIBRATION_IMAGES scenes of a generator stream no corpus seed uses."""
    samples = []
    for index in range(CALIBRATION_IMAGES):
        rng = np.random.default_rng([index, 0, 3])  # corpus images use [seed, index, 0]
        scene = CLASSES[index % len(CLASSES)]
        s = _Scene(rng)
        _DRAW[scene](s)
        samples.append(_candidates(rng, scene, s))
    return qa.acceptance(samples)


def _extent(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1) bounding box of a (H, W) mask, None when empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1] if rows.size else None


def make_sample(index: int, seed: int) -> Sample:
    """Image `index` of the corpus for `seed`; depends on nothing else."""
    rng = np.random.default_rng([seed, index, 0])
    scene = scene_of(index, seed)
    s = _Scene(rng)
    _DRAW[scene](s)
    image = s.render()
    image_id = f"syn-{index:06d}"
    return Sample(
        corpus=CORPUS,
        image_id=image_id,
        split=split_of(index, seed),
        image=image,
        label=CLASSES.index(scene),
        label_name=scene,
        captions=cap.captions(rng, scene, cap.facts(scene, s.counts, s.has, s.facts, {k: s.mask(k) for k in SURFACES})),
        qa=qa.questions(rng, image_id, _candidates(rng, scene, s), _acceptance()),
        meta={
            "scene": scene,
            "counts": dict(s.counts),
            "surfaces": dict(s.has),
            "facts": dict(s.facts),
            "extent": {kind: _extent(s.mask(kind)) for kind in qa.POSITION_MIN_PIXELS},
        },
    )


def _check_args(images: int, seed: int) -> None:
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise UserError(f"synthetic corpus: images must be a positive integer, got {images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"synthetic corpus: seed must be a non-negative integer, got {seed!r}")


def generate(images: int, seed: int) -> Iterator[Sample]:
    """The corpus: `images` samples, deterministic for `seed` (bad arguments raise here, not at the first sample)."""
    _check_args(images, seed)
    return (make_sample(index, seed) for index in range(images))


def write_synthetic(out: str, images: int = 600, seed: int = 0, shard_size: int | None = None) -> dict:
    """Generate the corpus and write it as `synthetic` under the store root `out` (local or s3://); -> its manifest.
    Shards as the writer cuts them (at least MIN_SHARDS per split), shuffled with `seed`, at most
    `shard_size` samples each (None: no cap)."""
    _check_args(images, seed)
    source = f"procedural: spatialnet_dist.corpora.synthetic, images={images}, seed={seed}"
    with ShardWriter(out, CORPUS, source=source, classes=CLASSES, shard_size=shard_size, shuffle_seed=seed) as writer:
        for sample in generate(images, seed):
            writer.write(sample)
    return read_manifest(out, CORPUS)
