"""Roads: straight asphalt bands across the whole picture, with dashed centre lines or without (country and
dirt roads). Cars drive on them (cars.py); nothing else stands on asphalt."""

from __future__ import annotations

from spatialnet_dist.corpora.synthetic.scene import ASPHALT, MARKING, SIZE, WATER, Scene, band


def road(s: Scene, axis: str, centre: int, width: int, rgb=(98, 98, 102), dashes: bool = True) -> bool:
    """A straight road across the image, rows ("h") or columns ("v") about `centre`; refused (False) where it
    would cross water."""
    lo = int(centre) - width // 2
    mask = band(axis, lo, lo + width)
    if (s.surface[mask] == WATER).any():
        return False
    s.paint(mask, rgb, blotch=0.05)
    s.surface[mask] = ASPHALT
    s.footprint["road"] |= mask
    s.has["road"] = True
    s.show("road")
    if dashes:
        start = int(s.rng.integers(0, 16))
        for t in range(start, SIZE, 18):
            xy = (t, centre, t + 8, centre) if axis == "h" else (centre, t, centre, t + 8)
            s.ops.append(("line", xy, {"fill": MARKING, "width": 1}))
    return True
