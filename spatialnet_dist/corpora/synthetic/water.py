"""Water: lakes, ponds and coasts (blue with ripples, optionally inside a sandy beach). Objects never stand
on water and roads never cross it."""

from __future__ import annotations

import numpy as np

from spatialnet_dist.corpora.synthetic.scene import GROUND, SIZE, WATER, Scene, pick, shape_mask


def water(s: Scene, mask, beach_mask=None) -> None:
    """Paint `mask` (H, W) as water, inside a sandy beach where `beach_mask` reaches beyond it on free ground."""
    if beach_mask is not None:
        s.paint(beach_mask & (s.surface == GROUND), (214, 198, 150), blotch=0.05)
        s.show("beach")
    rgb = pick(s.rng, ((42, 84, 132), (38, 100, 140), (50, 78, 112)))
    s.paint(mask, rgb, blotch=0.12, cells=5, fine=0.06)
    s.surface[mask] = WATER
    s.has["water"] = True
    s.show("water")


def blob(s: Scene, cx: float, cy: float, radius: float, wobble: float = 0.25) -> list[tuple[float, float]]:
    """Polygon of a smooth irregular blob (lake, pond): a circle whose radius varies by low harmonics."""
    theta = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    r = np.full_like(theta, radius)
    for k in (2, 3, 4):
        r += radius * wobble / k * s.rng.uniform(0.3, 1) * np.cos(k * theta + s.rng.uniform(0, 2 * np.pi))
    return list(zip((cx + r * np.cos(theta)).tolist(), (cy + r * np.sin(theta)).tolist()))


def pond(s: Scene) -> bool:
    """A small pond on free ground somewhere, if one fits."""
    for _ in range(10):
        r = float(s.rng.uniform(16, 28))
        cx, cy = s.rng.uniform(r + 8, SIZE - r - 8, 2)
        poly = blob(s, cx, cy, r)
        mask = shape_mask(lambda d, poly=poly: d.polygon(poly, fill=1))
        if (s.surface[mask] == GROUND).all() and not s.taken[mask].any():
            water(s, mask)
            s.taken[mask] = True
            return True
    return False
