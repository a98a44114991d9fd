"""The eight land-use scenes of the synthetic corpus, each composed of the scene elements (roads.py,
water.py, buildings.py, trees.py, cars.py) on its own ground, with the facts its captions may state
(`Scene.facts`). DRAW: class name -> its drawing, in the order of the corpus's labels."""

from __future__ import annotations

import numpy as np

from spatialnet_dist.corpora.synthetic.buildings import ROOFS, building, houses
from spatialnet_dist.corpora.synthetic.cars import cars_on_road, parking
from spatialnet_dist.corpora.synthetic.roads import road
from spatialnet_dist.corpora.synthetic.scene import MARKING, SIZE, Scene, band, pick, shape_mask
from spatialnet_dist.corpora.synthetic.trees import trees
from spatialnet_dist.corpora.synthetic.water import blob, pond, water

_FIELDS = {"green": (82, 140, 55), "yellow": (204, 182, 96), "brown": (138, 102, 66), "light green": (142, 178, 86)}
_GROUNDS = {"green": (100, 132, 64), "dry": (150, 148, 96)}  # highway verges
_MEDIANS = {"grass": (92, 128, 60), "concrete": (160, 158, 150)}
_GRASSES = {"light green": (136, 166, 78), "dry yellow": (184, 172, 104)}  # meadows


def _agricultural(s: Scene) -> None:
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
        name = pick(rng, list(_FIELDS))
        colours.append(name)
        mask = np.zeros((SIZE, SIZE), bool)
        mask[y0:y1, x0:x1] = True
        s.stripes(mask, _FIELDS[name], pick(rng, (0, 45, 90, 135)), rng.uniform(6, 12), rng.uniform(0.12, 0.22))
    s.show("field")
    if rng.random() < 0.4:  # a country road along the main cut instead of a dirt track
        road(s, "h" if transpose else "v", cut, int(rng.integers(8, 11)), rgb=(122, 118, 108), dashes=False)
        tracks = tracks[1:]
    for xy in tracks:
        s.ops.append(("line", xy, {"fill": (150, 122, 88), "width": 3}))
        s.show("track")
    s.taken |= shape_mask(lambda d: [d.line(xy, fill=1, width=5) for xy in tracks])  # nothing stands on a track
    if rng.random() < 0.15:
        pond(s)
    roof = pick(rng, ("red", "brown", "grey"))
    if rng.random() < 0.45:
        houses(s, int(rng.integers(1, 4)), ROOFS[roof], size=(14, 26))
    trees(s, int(rng.integers(0, 11)))
    s.facts.update(roof=roof, fields=sorted(set(colours)), parcels=len(parcels))


def _forest(s: Scene) -> None:
    rng = s.rng
    s.paint(None, (50, 68, 38), blotch=0.25, cells=10, fine=0.1)
    if rng.random() < 0.35:  # a dirt road through the woods, first so that the trees and the pond keep off it
        road(s, pick(rng, ("h", "v")), int(rng.integers(20, 236)), int(rng.integers(8, 12)), rgb=(112, 100, 80), dashes=False)
    if rng.random() < 0.25:
        pond(s)
    crown = pick(rng, ("dark green", "light green", "brown"))
    # sparse or dense, well apart (captions.DENSE_FOREST lies between), so that captions can tell
    trees(s, int(rng.integers(44, 64)) if rng.random() < 0.5 else int(rng.integers(14, 27)), r=(7, 12), crown=crown)
    s.facts.update(crown=crown)


def _residential(s: Scene) -> None:
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
        road(s, axis, centre, width)
    roof = pick(rng, ("red", "brown", "grey"))
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
        building(s, *lots[k], ROOFS[roof])
    houses(s, target - s.counts["building"], ROOFS[roof])
    for axis, centre in roads:
        cars_on_road(s, int(rng.integers(0, 5)), axis, centre - width // 2, centre + width // 2)
    trees(s, int(rng.integers(0, 13)), r=(5, 8))
    s.facts.update(roof=roof, streets=len(roads))


def _industrial(s: Scene) -> None:
    rng = s.rng
    s.paint(None, (168, 162, 150), blotch=0.07, cells=8)
    axis = pick(rng, ("h", "v"))
    centre = int(pick(rng, (rng.integers(18, 40), rng.integers(216, 238))))
    width = int(rng.integers(14, 19))
    road(s, axis, centre, width)
    # the parking area sits on the road's half of the image, the halls fill the rest
    lot_w, lot_h = int(rng.integers(70, 130)), int(rng.integers(50, 90))
    along = int(rng.integers(0, SIZE - lot_w))
    near = centre + width // 2 + 3 if centre < SIZE // 2 else centre - width // 2 - 3 - lot_h
    x0, y0 = (along, near) if axis == "h" else (near, along)
    w, h = (lot_w, lot_h) if axis == "h" else (lot_h, lot_w)
    parking(s, x0, y0, w, h, "h" if axis == "h" else "v")
    roof = pick(rng, ("white", "grey", "blue"))
    target, scale = int(rng.integers(2, 7)), 1.0
    for attempt in range(200):
        if s.counts["building"] >= target:
            break
        scale = max(0.45, scale * (0.97 if attempt % 10 == 9 else 1))  # shrink the halls when they do not fit
        w, h = int(rng.integers(36, 92) * scale), int(rng.integers(30, 80) * scale)
        building(s, *rng.integers(0, SIZE, 2), w, h, ROOFS[roof], hall=True, margin=4)
    cars_on_road(s, int(rng.integers(0, 4)), axis, centre - width // 2, centre + width // 2)
    trees(s, int(rng.integers(0, 6)), r=(5, 8))
    s.facts.update(roof=roof)


def _water(s: Scene) -> None:
    rng = s.rng
    s.paint(None, (98, 134, 64), blotch=0.12)
    beach = int(rng.integers(5, 14))
    if rng.random() < 0.5:  # a lake
        cx, cy = rng.uniform(96, 160, 2)
        radius = float(rng.uniform(55, 85))
        lake = blob(s, cx, cy, radius)
        shore = [
            (cx + (x - cx) * (radius + beach) / radius, cy + (y - cy) * (radius + beach) / radius) for x, y in lake
        ]
        water_mask = shape_mask(lambda d: d.polygon(lake, fill=1))
        sand = shape_mask(lambda d: d.polygon(shore, fill=1))
        s.facts["water"] = "lake"
    else:  # a coast: the sea covers one side up to a wavy shoreline
        depth = rng.uniform(80, 140)
        t = np.linspace(0, SIZE, 33)
        line = depth + 14 * np.sin(t / SIZE * rng.uniform(2, 6) + rng.uniform(0, 6)) + rng.normal(0, 3, t.shape)
        water_mask = shape_mask(lambda d: d.polygon([(0, 0), *zip(t.tolist(), line.tolist()), (SIZE, 0)], fill=1))
        sand = shape_mask(lambda d: d.polygon([(0, 0), *zip(t.tolist(), (line + beach).tolist()), (SIZE, 0)], fill=1))
        k = int(rng.integers(4))  # which side the sea is on
        water_mask, sand = np.rot90(water_mask, k).copy(), np.rot90(sand, k).copy()
        s.facts["water"] = "sea"
    water(s, water_mask, beach_mask=sand)
    s.taken |= sand & ~water_mask  # keep the beach clear
    if rng.random() < 0.3:
        road(s, pick(rng, ("h", "v")), int(rng.integers(20, 236)), int(rng.integers(8, 12)), dashes=False)
    roof = pick(rng, ("red", "brown", "white"))
    if rng.random() < 0.4:
        houses(s, int(rng.integers(1, 4)), ROOFS[roof])
    trees(s, int(rng.integers(0, 13)))
    s.facts.update(roof=roof)


def _highway(s: Scene) -> None:
    rng = s.rng
    ground = pick(rng, list(_GROUNDS))
    s.paint(None, _GROUNDS[ground], blotch=0.12)
    axis = pick(rng, ("h", "v"))
    lane, median = int(rng.integers(12, 16)), int(rng.integers(6, 13))
    top = int(rng.integers(70, 186 - 4 * lane - median))
    carriageways = [(top, top + 2 * lane), (top + 2 * lane + median, top + 4 * lane + median)]
    for lo, hi in carriageways:
        road(s, axis, (lo + hi) // 2, hi - lo, rgb=(78, 78, 84))
        for edge in (lo + 1, hi - 2):  # solid edge lines
            xy = (0, edge, SIZE, edge) if axis == "h" else (edge, 0, edge, SIZE)
            s.ops.append(("line", xy, {"fill": MARKING, "width": 1}))
    strip = band(axis, carriageways[0][1], carriageways[1][0])
    median_kind = pick(rng, list(_MEDIANS))
    s.paint(strip, _MEDIANS[median_kind], blotch=0.05)
    s.taken |= strip
    cars = int(rng.integers(3, 26))
    for i, (lo, hi) in enumerate(carriageways):
        cars_on_road(s, cars // 2 + (i == 0) * (cars % 2), axis, lo + 3, hi - 3)
    roof = None
    if rng.random() < 0.35:
        roof = pick(rng, ("red", "grey", "brown"))
        houses(s, int(rng.integers(1, 4)), ROOFS[roof])
    trees(s, int(rng.integers(0, 16)))
    s.facts.update(ground=ground, median=median_kind, axis=axis, roof=roof)


def _parkinglot(s: Scene) -> None:
    rng = s.rng
    s.paint(None, (100, 132, 66), blotch=0.12)
    axis = pick(rng, ("h", "v"))
    road_w = int(rng.integers(12, 17))
    road_at = int(pick(rng, (rng.integers(10, 20), rng.integers(236, 246))))
    road(s, axis, road_at, road_w)
    m = [int(v) for v in rng.integers(10, 32, 4)]  # grass margins around the lot
    x0, y0, x1, y1 = m[0], m[1], SIZE - m[2], SIZE - m[3]
    if axis == "h":
        y0, y1 = (max(y0, road_at + road_w // 2 + 4), y1) if road_at < 128 else (y0, min(y1, road_at - road_w // 2 - 4))
    else:
        x0, x1 = (max(x0, road_at + road_w // 2 + 4), x1) if road_at < 128 else (x0, min(x1, road_at - road_w // 2 - 4))
    parking(s, x0, y0, x1 - x0, y1 - y0, pick(rng, ("h", "v")))
    trees(s, int(rng.integers(0, 9)), r=(4, 7))
    if rng.random() < 0.25:
        houses(s, 1, ROOFS["grey"], size=(13, 18))
    s.facts.update(roof="grey")


def _meadow(s: Scene) -> None:
    rng = s.rng
    grass = pick(rng, list(_GRASSES))
    s.paint(None, _GRASSES[grass], blotch=0.16, cells=5, fine=0.08)
    if rng.random() < 0.5:  # a winding dirt path (not a road), first so that the pond keeps clear of it
        path = [(SIZE * k / 3, float(rng.uniform(0, SIZE))) for k in range(4)]
        if rng.random() < 0.5:
            path = [(y, x) for x, y in path]
        s.ops.append(("line", path, {"fill": (160, 138, 100), "width": int(rng.integers(3, 6)), "joint": "curve"}))
        s.taken |= shape_mask(lambda d: d.line(path, fill=1, width=8))
        s.show("track")
        s.facts["path"] = True
    if rng.random() < 0.25:
        pond(s)
    if rng.random() < 0.25:
        centre, width = int(rng.integers(30, 226)), int(rng.integers(8, 11))
        road(s, pick(rng, ("h", "v")), centre, width, rgb=(124, 120, 110), dashes=False)
    roof = pick(rng, ("red", "brown", "grey"))
    if rng.random() < 0.4:
        houses(s, int(rng.integers(1, 4)), ROOFS[roof], size=(14, 24))
    trees(s, int(rng.integers(3, 15)))
    s.facts.update(roof=roof, grass=grass)


DRAW = {
    "agricultural": _agricultural,
    "forest": _forest,
    "residential": _residential,
    "industrial": _industrial,
    "water": _water,
    "highway": _highway,
    "parkinglot": _parkinglot,
    "meadow": _meadow,
}
