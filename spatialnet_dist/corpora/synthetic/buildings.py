"""Buildings: houses with pitched roofs and industrial halls with flat seamed roofs, each casting a shadow;
counted in `counts["building"]` only when they fit whole on free ground."""

from __future__ import annotations

from spatialnet_dist.corpora.synthetic.scene import GROUND, SHADOW, SIZE, Scene

ROOFS = {
    "red": (172, 68, 52),
    "brown": (128, 88, 62),
    "grey": (132, 132, 138),
    "white": (222, 222, 216),
    "blue": (74, 104, 160),
}


def building(s: Scene, x, y, w, h, roof, hall: bool = False, margin: int = 2) -> bool:
    """A w x h building at (x, y) with `roof` (RGB); -> whether it fitted (and was drawn and counted)."""
    x, y, w, h = int(x), int(y), int(w), int(h)
    shift = 4 if hall else 3  # shadow offset: taller halls cast longer shadows
    if not s.fits(x, y, w + shift, h + shift, GROUND, margin):
        return False
    s.taken[y : y + h + shift, x : x + w + shift] = True
    s.footprint["building"][y : y + h, x : x + w] = True
    fill = tuple(int(c) for c in s.colour(roof, 10))
    dark = tuple(int(c * 0.78) for c in fill)
    s.ops.append(("rectangle", (x + shift, y + shift, x + w + shift - 1, y + h + shift - 1), {"fill": SHADOW}))
    s.ops.append(("rectangle", (x, y, x + w - 1, y + h - 1), {"fill": fill}))
    if hall:  # a flat roof with parallel seams
        step = int(s.rng.integers(6, 10))
        for t in range(step, (w if w >= h else h) - 2, step):
            xy = (x + t, y + 1, x + t, y + h - 2) if w >= h else (x + 1, y + t, x + w - 2, y + t)
            s.ops.append(("line", xy, {"fill": dark, "width": 1}))
    else:  # a pitched roof: the ridge along the long side, one slope darker
        if w >= h:
            s.ops.append(("rectangle", (x, y + h // 2, x + w - 1, y + h - 1), {"fill": dark}))
        else:
            s.ops.append(("rectangle", (x + w // 2, y, x + w - 1, y + h - 1), {"fill": dark}))
    s.counts["building"] += 1
    s.show("building")
    return True


def houses(s: Scene, n: int, roof, size=(13, 22)) -> None:
    """Up to n houses of sides in `size` at random free places."""
    rng = s.rng
    s.scatter(n, lambda: building(s, *rng.integers(0, SIZE, 2), *rng.integers(*size, 2), roof))
