"""Captions of the synthetic corpus: five per image, UCM style, each stating facts of THIS picture.

Every template names its class and at least one slot, and every slot is a fact that varies within the class:
how many houses, cars or trees there are ("a few houses", "many cars"), roof and field colours, how full a
parking lot is, how dense a forest or a residential area is, whether there is a road, pond or path, and
where a road or water area lies ("a road runs along the top of the image"). A template is usable for an
image only when the picture has all of its slots, and the five references of an image are five different
templates over the same facts, each slot in one of its wordings: they agree on what they say, so a model
that reads the picture can match them, while one fixed caption per class (the class oracle) cannot.

Side words are said only with a clear margin (SIDE_SHARE, SIDE_MARGIN) and only in phrasings that
symmetry.py maps under flips and rotations ("along the top of the image", "in the top left corner of
the image"); never "above"/"below" nor "on top of".
"""

from __future__ import annotations

import re
import string

import numpy as np

SIDE_SHARE = 0.8  # a thing lies on a side when this share of its pixels is in that half ...
SIDE_MARGIN = 40  # ... and its centroid is this many px (of 256) beyond the midline
DENSE_FOREST = 36  # trees from which a forest is dense (the drawing aims at under 26 or over 44)
_AN = re.compile(r"\b([Aa]) ([aeiou])")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four")
_NOUNS = {  # (singular, plural) caption nouns per object, by scene where it matters
    "building": {"industrial": (("building", "buildings"), ("warehouse", "warehouses")), "": (("house", "houses"),)},
    "car": {"": (("car", "cars"), ("vehicle", "vehicles"))},
    "tree": {"": (("tree", "trees"),)},
}

# Per class: templates whose {slots} are filled from `facts`; each names its class (see the module docstring).
# Most carry the class's main facts (fields and parcels; density and crown colour; density, roofs and streets;
# roofs, the road's side and the lot; the water and where it is; the highway's direction, verges and median;
# the lot's fullness and the road's side; the trees), so that the five references of an image share them.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "agricultural": (
        "farmland divided into {parcels} fields that are {fields}",
        "{parcels} {fields} fields of farmland with parallel crop lines",
        "an agricultural area with {parcels} {fields} fields",
        "a patchwork of {fields} farmland in {parcels} pieces",
        "farmland with {parcels} fields of {fields} crops",
        "{houses} next to {parcels} {fields} fields of farmland",
        "{parcels} {fields} fields of farmland lined with {T}",
        "{road} runs between the {parcels} {fields} fields of the farmland",
        "{pond} {pond_at} among the {fields} fields of the farmland",
        "{pond} among the {parcels} {fields} fields of the farmland",
    ),
    "forest": (
        "a {density} {crown} forest",
        "a piece of {density} woodland with {crown} trees",
        "{density} woods of {crown} trees",
        "this is a {density} forest with {crown} crowns",
        "{forest_ground} a {density} forest of {crown} trees",
        "a {density} {crown} forest with a road {road_at}",
        "{road} runs through a {density} forest of {crown} trees",
        "{pond} {pond_at} in a {density} {crown} forest",
        "{pond} in a {density} forest of {crown} trees",
    ),
    "residential": (
        "a {density} residential area with {houses}",
        "{houses} along {streets} streets in a residential area",
        "a {density} residential area with {roof} roofs and {streets} streets",
        "a residential area crossed by {streets} streets with {roof} roofed houses",
        "{B} with {roof} roofs in a {density} residential area",
        "{C_there} on the {streets} streets of a {density} residential area",
        "{T} among the {roof} roofed houses of a {density} residential area",
    ),
    "industrial": (
        "an industrial area with {houses} and a road {road_at}",
        "{B} with flat {roof} roofs in an industrial area with a {lot} parking lot",
        "an industrial area with {roof} roofs and a road {road_at}",
        "a road {road_at} leads to an industrial area with {roof} roofs",
        "a {lot} parking lot beside the {roof} roofed buildings of an industrial area",
        "the parking lot of this industrial area with {roof} roofs is {lot}",
        "{T} around the {roof} roofed buildings of an industrial area",
    ),
    "water": (
        "a blue {water} {place} with a sandy beach",
        "a {water} {place} with a sandy beach and {T}",
        "the {water} {place} is bordered by yellow sand and green grass",
        "a beach lies between the {water} {place} and the green land",
        "the shore of a {water} {place}",
        "a sandy beach along the {water} {place}",
        "a blue {water} with a sandy beach",
        "the shore of a {water} with a strip of sand",
        "the {water} is bordered by yellow sand and green grass",
        "a beach lies between the {water} and the green land",
        "a sandy beach along the {water}",
        "{T_there} near the {water} {place}",
        "{houses} near the shore of the {water}",
        "a road {road_at} near the {water}",
    ),
    "highway": (
        "a {axis} highway with {median} crosses {ground}",
        "a highway with {C} runs {axis_ly} across {ground}",
        "a highway runs {axis_ly} across {ground}",
        "a {axis} freeway divided by {median}",
        "a four lane highway with {median} runs {axis_ly} across the image",
        "a {axis} highway with two lanes in each direction on {ground}",
        "{C_there} on the {axis} highway",
        "a {axis} freeway with {C} driving on it",
        "the {axis} highway is lined with {T}",
        "{houses} beside the {axis} freeway",
    ),
    "parkinglot": (
        "a {fullness} parking lot with a road {road_at}",
        "a road {road_at} passes a {fullness} parking lot",
        "a parking lot that is {fullness} next to a road {road_at}",
        "{C} in a {fullness} parking lot",
        "a {fullness} parking lot with {C} parked in rows",
        "the {fullness} parking lot is surrounded by grass and {T}",
        "{houses} beside a {fullness} parking lot",
    ),
    "meadow": (
        "a {grass} meadow with {T}",
        "{T_there} scattered over the {grass} meadow",
        "an open grassland of {grass} grass with {T}",
        "a meadow of {grass} grass with {T}",
        "{T_there} in the {grass} meadow",
        "{houses} and {T} in the {grass} meadow",
        "{pond} {pond_at} in a {grass} meadow with {T}",
        "{pond} in a {grass} meadow with {T}",
        "{path} crosses the {grass} meadow with {T}",
        "a road {road_at} passes a {grass} meadow with {T}",
        "{road} runs through a {grass} meadow with {T}",
    ),
}


def _slots(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def side_of(mask: np.ndarray) -> tuple[str, ...]:
    """Sides of the image that mask (H, W) clearly lies on, the vertical one first: ("top",), ("bottom", "left")
    (a corner) or () where it lies on none (see SIDE_SHARE, SIDE_MARGIN)."""
    total = int(mask.sum())
    if not total:
        return ()
    out = []
    for first, second, axis in (("top", "bottom", 1), ("left", "right", 0)):
        profile = mask.sum(axis)  # (H,) pixels per row, or (W,) per column
        mid = profile.size // 2
        centroid = float(profile @ np.arange(profile.size)) / total
        if profile[:mid].sum() >= SIDE_SHARE * total and centroid <= mid - SIDE_MARGIN:
            out.append(first)
        elif profile[mid:].sum() >= SIDE_SHARE * total and centroid >= mid + SIDE_MARGIN:
            out.append(second)
    return tuple(out)


def _quantity_words(n: int) -> tuple[str, ...]:
    """Wordings of a count n >= 1: exact up to four, then 'some' (5-10) and 'many' (over 10)."""
    if n == 1:
        return ("a", "one")
    if n <= 4:
        return ("a few", _NUMBER_WORDS[n])
    if n <= 10:
        return ("some", "several")
    return ("many", "lots of")


def _quantities(n: int, nouns: tuple[tuple[str, str], ...]) -> list[str]:
    """Wordings of n objects (n >= 1): 'a house', 'two houses', 'a few houses', 'some houses', 'many houses'."""
    return [f"{w} {singular if n == 1 else plural}" for w in _quantity_words(n) for singular, plural in nouns]


def _roofed(n: int, roof: str, nouns: tuple[tuple[str, str], ...]) -> list[str]:
    """Wordings of n buildings with roofs of one colour: 'three houses with red roofs', 'a red roofed house'."""
    roofs = f"a {roof} roof" if n == 1 else f"{roof} roofs"
    out = []
    for w in _quantity_words(n):
        for singular, plural in nouns:
            noun = singular if n == 1 else plural
            out += [f"{w} {noun} with {roofs}", f"{w} {roof} roofed {noun}"]
    return out


def _there(phrases: list[str], n: int) -> list[str]:
    return [f"there {'is' if n == 1 else 'are'} {p}" for p in phrases]


def _along(sides: tuple[str, ...]) -> list[str]:
    """Where a full-length band (a road) lies: on one side only."""
    if len(sides) != 1:
        return []
    return [f"along the {sides[0]} of the image", f"at the {sides[0]} of the image"]


def _at(sides: tuple[str, ...]) -> list[str]:
    """Where an area (water, a pond) lies: a side or a corner."""
    if len(sides) == 2:
        return [f"in the {sides[0]} {sides[1]} corner of the image"]
    if len(sides) == 1:
        return [f"on the {sides[0]} side of the image", f"in the {sides[0]} part of the image"]
    return []


def facts(scene: str, counts: dict[str, int], has: dict[str, bool], drawn: dict, masks: dict[str, np.ndarray]
          ) -> dict[str, list[str]]:
    """Slot -> its wordings, for the slots this picture has: counts of buildings, cars and trees; has: road and
    water present; drawn: what the drawing chose (roof, fields, parcels, streets, water, stalls, parked, ground,
    median, axis, path); masks: (H, W) bool of "road" and "water"."""
    out: dict[str, list[str]] = {}
    for key, obj in (("B", "building"), ("C", "car"), ("T", "tree")):
        n = counts[obj]
        if n:
            nouns = _NOUNS[obj].get(scene, _NOUNS[obj][""])
            out[key] = _quantities(n, nouns)
            out[key + "_there"] = _there(out[key], n)
            if obj == "building":
                out["roof"] = [drawn["roof"]]
                out["houses"] = _roofed(n, drawn["roof"], nouns)
    if has["road"]:
        out["road"] = ["a road"]
        if along := _along(side_of(masks["road"])):
            out["road_at"] = along
    if has["water"] and scene != "water":
        out["pond"] = ["a small pond", "a pond"]
        if at := _at(side_of(masks["water"])):
            out["pond_at"] = at
    if drawn.get("path"):
        out["path"] = ["a dirt path", "a winding dirt path"]
    if scene == "agricultural":
        colours = drawn["fields"]
        out["fields"] = [", ".join(colours[:-1]) + " and " + colours[-1] if len(colours) > 1 else colours[0]]
        out["parcels"] = [_NUMBER_WORDS[drawn["parcels"]]]
    elif scene == "forest":
        dense = counts["tree"] >= DENSE_FOREST
        out["density"] = ["dense", "thick"] if dense else ["sparse", "open"]
        out["forest_ground"] = ["the ground is hidden under"] if dense else ["the ground shows through"]
        out["crown"] = [drawn["crown"]]
    elif scene == "meadow":
        out["grass"] = [drawn["grass"]]
    elif scene == "residential":
        b = counts["building"]
        out["density"] = ["dense" if b >= 25 else "medium density" if b >= 13 else "sparse"]
        out["streets"] = [_NUMBER_WORDS[drawn["streets"]]]
    elif scene in ("industrial", "parkinglot"):
        full = drawn["parked"] / max(drawn["stalls"], 1)
        fullness = ["nearly full"] if full > 0.6 else ["half empty", "half full"] if full > 0.3 else ["mostly empty"]
        out["lot" if scene == "industrial" else "fullness"] = fullness
    elif scene == "water":
        out["water"] = [drawn["water"]]
        if drawn["water"] == "lake":  # the drawing keeps its centre within 32 px of the image's
            out["place"] = ["in the middle of the image", "in the centre of the image"]
        elif at := _at(side_of(masks["water"])):
            out["place"] = at
    elif scene == "highway":
        out["axis"] = ["horizontal" if drawn["axis"] == "h" else "vertical"]
        out["axis_ly"] = [out["axis"][0] + "ly"]
        out["ground"] = ["green grassland", "green grass"] if drawn["ground"] == "green" else ["dry brown land", "dry land"]
        out["median"] = (["a grass median strip", "a green median strip"] if drawn["median"] == "grass"
                         else ["a concrete median strip", "a grey median strip"])
    return out


def captions(rng: np.random.Generator, scene: str, slots: dict[str, list[str]], n: int = 5) -> list[str]:
    """n distinct captions: n of the class's templates usable with `slots` (from `facts`), drawn with weights
    that grow with the facts a template states (so that the references share most of the image's facts),
    each slot in a random wording; UCM style (capitalised, full stop)."""
    usable = [t for t in TEMPLATES[scene] if _slots(t) <= slots.keys()]
    if len(usable) < n:
        raise ValueError(f"synthetic {scene} image: only {len(usable)} caption templates fit, {n} needed")
    weight = np.array([len(_slots(t)) ** 2 for t in usable], float)
    out = []
    for k in rng.choice(len(usable), n, replace=False, p=weight / weight.sum()):
        text = usable[k].format(**{name: options[int(rng.integers(len(options)))] for name, options in slots.items()})
        text = _AN.sub(r"\1n \2", text)  # "a open forest" -> "an open forest"
        out.append(text[0].upper() + text[1:] + ".")
    return out
