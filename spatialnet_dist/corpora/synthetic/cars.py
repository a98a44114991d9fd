"""Cars on asphalt: driving along roads, or parked in the marked stalls of a parking lot; counted in
`counts["car"]`."""

from __future__ import annotations

import numpy as np

from spatialnet_dist.corpora.synthetic.scene import ASPHALT, MARKING, SIZE, Scene, pick

CAR_COLOURS = ((235, 235, 235), (190, 190, 198), (200, 40, 40), (40, 80, 190), (225, 200, 40), (40, 140, 150))
LOT_SHARES = ((0.08, 0.22), (0.38, 0.52), (0.7, 0.88))  # mostly empty, half full, nearly full (see captions)


def car(s: Scene, x, y, horizontal: bool, margin: int = 1) -> bool:
    """A 13 x 7 car (7 x 13 upright) at (x, y) on asphalt; -> whether it fitted (and was drawn and counted)."""
    x, y = int(x), int(y)
    w, h = (13, 7) if horizontal else (7, 13)
    if not s.fits(x, y, w, h, ASPHALT, margin):
        return False
    s.taken[y : y + h, x : x + w] = True
    body = pick(s.rng, CAR_COLOURS)
    glass = (x + 8, y + 1, x + 10, y + 5) if horizontal else (x + 1, y + 8, x + 5, y + 10)
    s.ops.append(("rectangle", (x, y, x + w - 1, y + h - 1), {"fill": body}))
    s.ops.append(("rectangle", glass, {"fill": (45, 50, 60)}))
    s.counts["car"] += 1
    s.show("car")
    return True


def cars_on_road(s: Scene, n: int, axis: str, lo: int, hi: int) -> None:
    """Up to n cars driving along a road band lo..hi-1 (rows for "h", columns for "v")."""
    rng = s.rng

    def put() -> bool:
        along, across = int(rng.integers(0, SIZE)), int(rng.integers(lo, hi - 7))
        return car(s, along, across, True) if axis == "h" else car(s, across, along, False)

    s.scatter(n, put)


def parking(s: Scene, x0: int, y0: int, w: int, h: int, axis: str) -> None:
    """An asphalt lot with rows of marked stalls, a share of them taken at random (facts "stalls", "parked"):
    a share from one of LOT_SHARES, so that how full the lot is can be told, and at most 100 cars (the
    count questions' bins stop there)."""
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0 : y0 + h, x0 : x0 + w] = True
    s.paint(mask, (84, 84, 88), blotch=0.05)
    s.surface[mask] = ASPHALT
    s.show("parking-lot")
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
            s.ops.append(("line", (*a, *b), {"fill": MARKING, "width": 1}))
        slots += [to_xy(3 + j * stall_w + 2, v + 2) for j in range(per_row)]
    cars = min(round(s.rng.uniform(*pick(s.rng, LOT_SHARES)) * len(slots)), 100)
    parked = sum(car(s, *slots[k], horizontal=axis == "v", margin=0) for k in s.rng.permutation(len(slots))[:cars])
    s.facts.update(stalls=len(slots), parked=parked)
