"""Trees: round crowns with a lit side and a shadow, on free ground; counted in `counts["tree"]`."""

from __future__ import annotations

from spatialnet_dist.corpora.synthetic.scene import GROUND, SHADOW, SIZE, Scene

CROWNS = {"green": (58, 112, 48), "dark green": (40, 88, 38), "light green": (104, 146, 58), "brown": (128, 92, 50)}


def tree(s: Scene, x, y, r, crown: str = "green", margin: int = 1) -> bool:
    """A tree of crown radius r whose box starts at (x, y); -> whether it fitted (and was drawn and counted)."""
    x, y, r = int(x), int(y), int(r)
    d = 2 * r + 1
    if not s.fits(x, y, d + 2, d + 2, GROUND, margin):
        return False
    s.taken[y : y + d + 2, x : x + d + 2] = True
    s.footprint["tree"][y : y + d, x : x + d] = True  # the crown's box
    rgb = s.colour(CROWNS[crown], 14)
    light = tuple(int(min(255, c * 1.3)) for c in rgb)
    k = r // 3
    s.ops.append(("ellipse", (x + 2, y + 2, x + d + 1, y + d + 1), {"fill": SHADOW}))
    s.ops.append(("ellipse", (x, y, x + d - 1, y + d - 1), {"fill": tuple(int(c) for c in rgb)}))
    s.ops.append(("ellipse", (x + k, y + k, x + k + r, y + k + r), {"fill": light}))
    s.counts["tree"] += 1
    s.show("tree")
    return True


def trees(s: Scene, n: int, r=(5, 9), crown: str = "green") -> None:
    """Up to n trees of radius in `r` at random free places."""
    rng = s.rng
    s.scatter(n, lambda: tree(s, *rng.integers(0, SIZE, 2), rng.integers(*r), crown=crown))
