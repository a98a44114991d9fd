"""Questions of the synthetic corpus: RSVQA-LR types (presence, count, comp, rural_urban) and `position`
("is there a road in the top part of the image?"), each true of its picture and none guessable from its words.

Every image offers candidates (qtype, key, answer): `key` fixes the question's words up to the template
(presence ("tree",), comp ("building", "tree", "more"), position ("water", "top left"), ...). A text whose answer
is nearly always the same ("is there a tree?": yes) would let a model answer without looking, so a candidate
is kept with a probability set per (qtype, key, answer class) from how often each class turns up for that key
over a calibration sample of scenes (`acceptance`): the kept answers of every key spread evenly over the
classes its type takes, so a question-only guess does no better than the type's majority answer.

What may be asked, so that the picture answers it at 128 px:
  comp      two of buildings, cars and trees, only when one count is clearly larger (by 2 and by half the other);
  position  whether a half or a quarter of the image (REGIONS) holds a building, road or water area, asked only
            of an image that shows one: yes when one object's worth of it (POSITION_MIN_PIXELS) lies in the
            region at least POSITION_MARGIN px (of 256) clear of the midlines, no when none of it comes within
            POSITION_MARGIN px of the region; presence alone never tells the answer.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from spatialnet_dist.text import rsvqa_lr_count_bin

QA_NOUNS = {
    "building": ("building", "buildings"),
    "car": ("car", "cars"),
    "tree": ("tree", "trees"),
    "road": ("road", "roads"),
    "water": ("water area", "water areas"),
}
PRESENCE_TEMPLATES = ("is there a {sg}?", "are there {pl}?", "is a {sg} present in the image?")
COUNT_TEMPLATES = ("how many {pl} are there?", "what is the number of {pl}?", "how many {pl} are in the image?")
COMP_TEMPLATES = {
    "more": ("are there more {a} than {b}?", "is the number of {a} greater than the number of {b}?"),
    "fewer": ("are there fewer {a} than {b}?", "is the number of {a} smaller than the number of {b}?"),
}
RURAL_URBAN_TEMPLATES = ("is it a rural or an urban area?", "is this a rural or an urban area?")
POSITION_TEMPLATES = {
    "side": ("is there a {sg} on the {side} side of the image?", "are there {pl} in the {side} half of the image?"),
    "part": ("is there a {sg} in the {side} part of the image?", "are there {pl} in the {side} half of the image?"),
    "quarter": ("is there a {sg} in the {side} corner of the image?", "are there {pl} in the {side} quarter of the image?"),
}
# The halves and quarters position questions name; a quarter is the vertical side first, as English says it.
REGIONS = ("left", "right", "top", "bottom", "top left", "top right", "bottom left", "bottom right")
POSITION_MARGIN = 16
# Trees are left out: green crowns on green ground hardly stand out at 128 px.
POSITION_MIN_PIXELS = {"building": 150, "road": 400, "water": 400}  # about one whole object
COMP_OBJECTS = ("building", "car", "tree")
# Most kept per type. Sides take many questions to learn: with 2 per image (465 in the demo's training split)
# the demo's position accuracy stayed at the question-only guess (0.60 against 0.58); 16 give ~4 per image.
# Comparisons and counts likewise: beside that many position questions, 2 comparisons per image (558) left them
# at 0.49 and 4 (1,155) gave 0.61; 6 comparisons and 3 counts (1,717 and 596) gave 0.78 and count MAE 4.7.
PER_IMAGE = {"presence": 2, "count": 3, "comp": 6, "rural_urban": 1, "position": 16}
MIN_SEEN = 4  # a key is asked only if calibration saw each of its type's answer classes this often

Candidate = tuple[str, tuple, str]  # (qtype, key, answer)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def answer_class(qtype: str, answer: str) -> str:
    """What balancing and scoring compare: the RSVQA-LR bin for counts, the answer itself otherwise."""
    return rsvqa_lr_count_bin(answer) if qtype == "count" else answer


def clearly_more(n: int, m: int) -> bool:
    return n - m >= max(2, m / 2)


def region_pixels(mask: np.ndarray, region: str, margin: int) -> int:
    """Pixels of mask (H, W) in `region` (one of REGIONS) with its inner edges moved `margin` px towards the
    image's midlines (negative: away from them, into the region)."""
    height, width = mask.shape
    rows, cols = slice(None), slice(None)
    for side in region.split():
        if side in ("top", "bottom"):
            rows = slice(None, height // 2 + margin) if side == "top" else slice(height // 2 - margin, None)
        else:
            cols = slice(None, width // 2 + margin) if side == "left" else slice(width // 2 - margin, None)
    return int(mask[rows, cols].sum())


def region_answer(mask: np.ndarray, region: str, min_pixels: int) -> str | None:
    """"yes" when min_pixels of mask (H, W) lie in the region clear of its inner edges, "no" when none come
    within POSITION_MARGIN px of it, None (not asked) in between."""
    if region_pixels(mask, region, -POSITION_MARGIN) >= min_pixels:
        return "yes"
    return "no" if region_pixels(mask, region, POSITION_MARGIN) == 0 else None


def candidates(
    urban: bool, counts: dict[str, int], surfaces: dict[str, bool], masks: dict[str, np.ndarray]
) -> list[Candidate]:
    """Everything the picture answers: counts of objects, presence of objects and surfaces, (H, W) masks by kind."""
    present = {**{o: n > 0 for o, n in counts.items()}, **surfaces}
    out: list[Candidate] = [("presence", (o,), "yes" if p else "no") for o, p in present.items()]
    out += [("count", (o,), str(n)) for o, n in counts.items()]
    for i, a in enumerate(COMP_OBJECTS):
        for b in COMP_OBJECTS[i + 1 :]:
            if not (clearly_more(counts[a], counts[b]) or clearly_more(counts[b], counts[a])):
                continue
            # Every wording of the pair is a candidate (the shortlist draws among them): calibration then sees
            # each wording in every scene that asks the pair, not in a coin-flipped quarter of them.
            for first, second in ((a, b), (b, a)):
                for relation, truth in (("more", counts[first] > counts[second]), ("fewer", counts[first] < counts[second])):
                    out.append(("comp", (first, second, relation), "yes" if truth else "no"))
    out.append(("rural_urban", (), "urban" if urban else "rural"))
    for kind, mask in masks.items():
        if mask.sum() < POSITION_MIN_PIXELS[kind]:
            continue  # (almost) not in the picture: "where" has no answer, and presence would give "no" away
        for region in REGIONS:
            if (answer := region_answer(mask, region, POSITION_MIN_PIXELS[kind])) is not None:
                out.append(("position", (kind, region), answer))
    return out


def shortlist(rng: np.random.Generator, cands: list[Candidate]) -> list[Candidate]:
    """At most PER_IMAGE candidates of each type, drawn before any answer is looked at: a cap applied after
    `acceptance` would keep an image's candidates by what the others answered, and undo the balance."""
    by_type: dict[str, list[Candidate]] = defaultdict(list)
    for cand in cands:
        by_type[cand[0]].append(cand)
    return [by_type[qtype][k] for qtype, most in PER_IMAGE.items() for k in rng.permutation(len(by_type[qtype]))[:most]]


def acceptance(samples: list[list[Candidate]]) -> dict[tuple, float]:
    """(qtype, key, answer class) -> probability of keeping such a candidate, from the shortlisted candidates of
    a calibration sample: each key's rarest class is always kept and the others as often as the rarest turns up.
    A key that lacks one of its type's classes (or saw it under MIN_SEEN times) is never asked."""
    seen: dict[tuple, Counter] = defaultdict(Counter)  # (qtype, key) -> answer class counts
    for cands in samples:
        for qtype, key, answer in cands:
            seen[qtype, key][answer_class(qtype, answer)] += 1
    classes: dict[str, set] = defaultdict(set)
    for (qtype, _), n in seen.items():
        classes[qtype] |= set(n)
    out = {}
    for (qtype, key), n in seen.items():
        rarest = min(n[c] for c in classes[qtype])
        if rarest >= MIN_SEEN:
            out.update({(qtype, key, c): rarest / n[c] for c in classes[qtype]})
    return out


def phrase(rng: np.random.Generator, qtype: str, key: tuple) -> str:
    if qtype == "presence":
        sg, pl = QA_NOUNS[key[0]]
        return _pick(rng, PRESENCE_TEMPLATES).format(sg=sg, pl=pl)
    if qtype == "count":
        return _pick(rng, COUNT_TEMPLATES).format(pl=QA_NOUNS[key[0]][1])
    if qtype == "comp":
        first, second, relation = key
        return _pick(rng, COMP_TEMPLATES[relation]).format(a=QA_NOUNS[first][1], b=QA_NOUNS[second][1])
    if qtype == "rural_urban":
        return _pick(rng, RURAL_URBAN_TEMPLATES)
    if qtype == "position":
        kind, side = key
        sg, pl = QA_NOUNS[kind]
        templates = POSITION_TEMPLATES["quarter" if " " in side else "side" if side in ("left", "right") else "part"]
        return _pick(rng, templates).format(sg=sg, pl=pl, side=side)
    raise ValueError(f"unknown question type {qtype!r}")


def questions(rng: np.random.Generator, image_id: str, cands: list[Candidate], accept: dict[tuple, float]) -> list[dict]:
    """The image's questions: its shortlisted candidates (already capped per type) that `accept` keeps."""
    qa = []
    for qtype, key, answer in cands:
        if rng.random() < accept.get((qtype, key, answer_class(qtype, answer)), 0.0):
            qa.append({"qid": f"{image_id}-q{len(qa)}", "question": phrase(rng, qtype, key), "answer": answer, "type": qtype})
    return qa
