"""The synthetic demo corpus: deterministic, valid, true of its pictures, not guessable, written through the store.

Truth is checked against `meta` (what the drawing placed) by parsing the questions and captions here, independently
of the templates in corpora/synthetic.py.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest

from spatialnet_dist.corpora.synthetic import CLASSES, URBAN_SCENES, generate, write_synthetic
from spatialnet_dist.corpora.synthetic.landuse import DRAW
from spatialnet_dist.corpora.synthetic.qa import PER_IMAGE
from spatialnet_dist.corpora.synthetic.scene import TAGS, Scene
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.schema import decode_sample, validate_record
from spatialnet_dist.text import rsvqa_lr_count_bin, words

QTYPES = ("presence", "count", "comp", "rural_urban", "position")
SIDES = ("left", "right", "top", "bottom")
SCENE_WORDS = {
    "agricultural": {"farmland", "fields", "agricultural"},
    "forest": {"forest", "woodland", "woods"},
    "residential": {"residential"},
    "industrial": {"industrial"},
    "water": {"lake", "sea", "water"},
    "highway": {"highway", "freeway"},
    "parkinglot": {"parking"},
    "meadow": {"meadow", "grassland"},
}
# words that name a counted object in questions and captions
OBJECT_WORDS = {
    "building": {"building", "buildings", "house", "houses", "warehouse", "warehouses", "factories", "roofs", "roofed"},
    "car": {"car", "cars", "vehicle", "vehicles"},
    "tree": {"tree", "trees"},
}
ROOF_COLOURS = ("red", "grey", "brown", "white", "blue")
QUANTITY = re.compile(
    r"\b(a few|lots of|a|one|two|three|four|some|several|many) (?:(?:red|grey|brown|white|blue) roofed )?"
    r"(house|building|warehouse|car|vehicle|tree)s?\b"
)
ROOF = re.compile(r"\b(red|grey|brown|white|blue) (?:roofed|roofs?)\b")
SIDE = re.compile(r"\b(road|pond|sea|lake)\b[a-z ]*? (?:along|at|on|in) the (top|bottom|left|right)(?: (left|right))? "
                  r"(?:edge |side |part |corner )?of the image")
WORD_FACTS = {  # per scene: {words in a caption: (fact kind, the value the words claim)}
    "agricultural": {},
    "forest": {"dense": ("density", "dense"), "thick": ("density", "dense"), "hidden": ("density", "dense"),
               "sparse": ("density", "sparse"), "open": ("density", "sparse"), "shows": ("density", "sparse"),
               "dark green": ("crown", "dark green"), "light green": ("crown", "light green"), "brown": ("crown", "brown")},
    "residential": {"dense residential": ("density", "dense"), "medium density": ("density", "medium"),
                    "sparse residential": ("density", "sparse")},
    "industrial": {},
    "water": {"lake": ("water", "lake"), "sea": ("water", "sea")},
    "highway": {"horizontal": ("axis", "h"), "horizontally": ("axis", "h"), "vertical": ("axis", "v"),
                "vertically": ("axis", "v"), "green grass": ("ground", "green"), "dry": ("ground", "dry"),
                "grass median": ("median", "grass"), "green median": ("median", "grass"),
                "concrete median": ("median", "concrete"), "grey median": ("median", "concrete")},
    "parkinglot": {},
    "meadow": {"light green": ("grass", "light green"), "dry yellow": ("grass", "dry yellow")},
}
FULLNESS = {"nearly full": "full", "half empty": "half", "half full": "half", "mostly empty": "empty"}


def quantity_holds(word: str, n: int) -> bool:
    exact = {"a": 1, "one": 1, "two": 2, "three": 3, "four": 4}
    if word in exact:
        return n == exact[word]
    if word == "a few":
        return 2 <= n <= 4
    if word in ("some", "several"):
        return 5 <= n <= 10
    return n > 10  # many, lots of, a lot of


def object_in(text: str) -> list[str]:
    """Counted objects or surfaces a question names, in order of appearance."""
    found = []
    for w in words(text):
        for obj, names in OBJECT_WORDS.items():
            if w in names:
                found.append(obj)
        if w in ("road", "roads"):
            found.append("road")
        if w == "water":
            found.append("water")
    return found


@pytest.fixture(scope="module")
def corpus():
    return list(generate(600, seed=0, processes=2))  # the demo's corpus, drawn in processes as write_synthetic does


def test_deterministic_for_a_seed(corpus):
    a, b, c = list(generate(12, 3)), list(generate(12, 3)), list(generate(12, 4))
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image)
        assert x.record() == y.record()
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c))
    assert [x.record() for x in a] != [z.record() for z in c]
    for x, y in zip(generate(12, 0), corpus):  # one process draws what two drew
        assert np.array_equal(x.image, y.image)
        assert x.record() == y.record()


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="images"):
        generate(0, 0)
    with pytest.raises(UserError, match="seed"):
        generate(10, -1)


def test_splits_and_classes_are_balanced(corpus):
    splits = Counter(s.split for s in corpus)
    assert splits == {"train": 480, "val": 60, "test": 60}
    assert {s.split for s in generate(10, 5)} == {"train", "val", "test"}
    classes = Counter(s.label_name for s in corpus)
    assert set(classes) == set(CLASSES)
    assert max(classes.values()) <= 2 * min(classes.values())


def test_records_are_valid(corpus):
    qids = set()
    for s in corpus:
        rec = validate_record(s.record())
        assert rec["corpus"] == "synthetic"
        assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
        assert s.label == CLASSES.index(s.label_name) == CLASSES.index(s.meta["scene"])
        assert len(s.captions) == len(set(s.captions)) == 5
        assert 1 <= len(s.qa) <= sum(PER_IMAGE.values())
        for k, q in enumerate(s.qa):
            assert q["qid"] == f"{s.image_id}-q{k}" and q["qid"] not in qids
            qids.add(q["qid"])
        assert set(s.meta["counts"]) == {"building", "car", "tree"}
    assert {q["type"] for s in corpus for q in s.qa} == set(QTYPES)


def test_tags_are_the_elements_the_picture_shows(corpus):
    for s in corpus:
        tags, scene, meta = set(s.tags), s.meta["scene"], s.meta
        assert s.tags == sorted(tags) and tags <= set(TAGS), s.tags
        for kind, n in meta["counts"].items():  # an object is tagged when one fitted, and then it is counted
            assert (kind in tags) == (n > 0), (s.image_id, kind, n, s.tags)
        for kind, present in meta["surfaces"].items():
            assert (kind in tags) == present, (s.image_id, kind, s.tags)
        for kind, extent in meta["extent"].items():  # and where it is tagged, its pixels are in the picture
            assert (kind in tags) == (extent is not None), (s.image_id, kind, s.tags)
        assert ("field" in tags) == (scene == "agricultural") and ("beach" in tags) == (scene == "water")
        assert ("parking-lot" in tags) == ("stalls" in meta["facts"])
        assert "track" not in tags or scene in ("agricultural", "meadow")
        if scene == "meadow":
            assert ("track" in tags) == bool(meta["facts"].get("path"))
    # Tags are not the class under another name: most of them come and go within a class.
    by_class = defaultdict(list)
    for s in corpus:
        by_class[s.meta["scene"]].append(set(s.tags))
    varying = {t for sets in by_class.values() for t in TAGS if 0 < sum(t in tags for tags in sets) < len(sets)}
    assert {"building", "road", "track", "tree", "water"} <= varying
    assert {t for s in corpus for t in s.tags} == set(TAGS)


def drawn_masks(s, seed: int = 0) -> dict[str, np.ndarray]:
    """(H, W) masks of the building, road and water of sample s, drawn again from its seed."""
    scene = Scene(np.random.default_rng([seed, int(s.image_id.removeprefix("syn-")), 0]))
    DRAW[s.meta["scene"]](scene)
    return {kind: scene.mask(kind) for kind in ("building", "road", "water")}


def pixels_in(mask: np.ndarray, sides: set[str], reach: int) -> int:
    """Pixels of mask in the half or quarter `sides` name, its inner edges `reach` px past the midlines."""
    ys, xs = np.nonzero(mask)
    mid = mask.shape[0] // 2
    inside = np.ones(ys.size, dtype=bool)
    for side, coord, first in (("left", xs, True), ("right", xs, False), ("top", ys, True), ("bottom", ys, False)):
        if side in sides:
            inside &= coord < mid + reach if first else coord >= mid - reach
    return int(inside.sum())


def test_answers_are_true_of_the_picture(corpus):
    for s in corpus:
        counts, surfaces = s.meta["counts"], s.meta["surfaces"]
        masks = drawn_masks(s) if any(q["type"] == "position" for q in s.qa) else {}
        for q in s.qa:
            named, answer = object_in(q["question"]), q["answer"]
            if q["type"] == "count":
                assert answer == str(counts[named[0]]), q
            elif q["type"] == "presence":
                present = counts[named[0]] > 0 if named[0] in counts else surfaces[named[0]]
                assert answer == ("yes" if present else "no"), (q, s.meta)
            elif q["type"] == "comp":
                a, b = (counts[o] for o in named)
                more = bool({"more", "greater"} & set(words(q["question"])))
                assert answer == ("yes" if (a > b if more else a < b) else "no"), (q, s.meta)
                assert max(a, b) >= min(a, b) + 2, (q, s.meta)  # asked only where the difference is plain to see
            elif q["type"] == "position":
                sides, mask = set(words(q["question"])) & set(SIDES), masks[named[0]]
                assert len(sides) in (1, 2) and mask.sum() >= 150, (q, s.meta)  # asked only of what the image shows
                if answer == "yes":  # an object's worth of it inside the region, clear of the midlines
                    assert pixels_in(mask, sides, -16) >= 150, (q, s.meta)
                else:  # none of it near the region
                    assert answer == "no" and pixels_in(mask, sides, 16) == 0, (q, s.meta)
            else:
                assert answer == ("urban" if s.meta["scene"] in URBAN_SCENES else "rural"), q


def test_captions_are_true_of_the_picture(corpus):
    for s in corpus:
        counts = s.meta["counts"]
        for caption in s.captions:
            assert SCENE_WORDS[s.label_name] & set(words(caption)), (s.label_name, caption)
            for obj in {o for o in object_in(caption) if o in counts}:
                assert counts[obj] > 0, (caption, s.meta)  # an absent object is never mentioned
            for quantity, noun in QUANTITY.findall(caption.lower()):
                obj = {"house": "building", "warehouse": "building", "vehicle": "car"}.get(noun, noun)
                assert quantity_holds(quantity, counts[obj]), (caption, s.meta)


def quantity_bin(n: int) -> str:
    return "none" if n == 0 else "one" if n == 1 else "a few" if n <= 4 else "some" if n <= 10 else "many"


def fact_values(meta: dict) -> dict:
    """What the picture shows, per fact kind a caption may state (the truth the claims are checked against)."""
    counts, facts, extent = meta["counts"], meta["facts"], meta["extent"]
    out = {f"count {o}": quantity_bin(n) for o, n in counts.items()}
    out["roof"] = facts.get("roof") if counts["building"] else None
    out["has road"], out["has water"], out["has path"] = meta["surfaces"]["road"], meta["surfaces"]["water"], "path" in facts
    b, trees = counts["building"], counts["tree"]
    if meta["scene"] == "residential":
        out["density"] = "dense" if b >= 25 else "medium" if b >= 13 else "sparse"
        out["streets"] = facts["streets"]
    if meta["scene"] == "forest":
        out["density"] = "dense" if trees >= 36 else "sparse"
    if "stalls" in facts:
        share = facts["parked"] / facts["stalls"]
        out["fullness"] = "full" if share > 0.6 else "half" if share > 0.3 else "empty"
    for kind in ("crown", "water", "axis", "ground", "median", "grass", "parcels"):
        out[kind] = facts.get(kind)
    out["fields"] = tuple(facts.get("fields", ()))
    for thing in ("road", "water"):
        box = extent[thing]
        out[f"{thing} at"] = None if box is None else ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)  # (x, y) centre
    return out


def claims(caption: str, scene: str, meta: dict) -> list[tuple[str, bool]]:
    """(fact kind, whether the picture bears it out) for every fact of the picture the caption states."""
    text, counts, facts = caption.lower().rstrip("."), meta["counts"], meta["facts"]
    truth = fact_values(meta)
    out = []
    for quantity, noun in QUANTITY.findall(text):
        obj = {"house": "building", "warehouse": "building", "vehicle": "car"}.get(noun, noun)
        out.append((f"count {obj}", quantity_holds(quantity, counts[obj])))
    for colour in ROOF.findall(text):
        out.append(("roof", colour == truth["roof"]))
    text_wo_roofs = ROOF.sub("", text)
    for words_, (kind, value) in WORD_FACTS[scene].items():
        if re.search(rf"\b{words_}\b", text_wo_roofs):
            out.append((kind, value == truth[kind]))
    for phrase, value in FULLNESS.items():
        if phrase in text:
            out.append(("fullness", value == truth["fullness"]))
    if scene == "residential":
        for number in re.findall(r"\b(two|three|four) streets\b", text):
            out.append(("streets", ("two", "three", "four").index(number) + 2 == truth["streets"]))
    if scene == "agricultural":
        named = tuple(sorted(re.findall(r"\b(light green|green|yellow|brown)\b", text_wo_roofs)))
        if named:
            out.append(("fields", named == tuple(sorted(facts["fields"]))))
        without_counts = QUANTITY.sub("", text)
        for number in re.findall(r"\b(two|three|four)\b", without_counts):
            out.append(("parcels", ("two", "three", "four").index(number) + 2 == truth["parcels"]))
    for thing, present in (("road", "has road"), ("pond", "has water"), ("path", "has path")):
        if re.search(rf"\b{thing}\b", text) and not (scene in ("industrial", "parkinglot") and thing == "road"):
            out.append((present, truth[present]))
    for thing, first, second in SIDE.findall(text):
        centre = truth["road at" if thing == "road" else "water at"]
        ok = centre is not None
        for side in (first, second):
            if ok and side:  # the drawn thing's box centre lies well beyond the midline on that side
                x_or_y = centre[0] if side in ("left", "right") else centre[1]
                ok = x_or_y <= 128 - 24 if side in ("left", "top") else x_or_y >= 128 + 24
        out.append((f"{thing} at", ok))
    if "middle of the image" in text or "centre of the image" in text:
        centre = truth["water at"]
        out.append(("water at", abs(centre[0] - 128) <= 48 and abs(centre[1] - 128) <= 48))
    return out


def test_captions_state_facts_that_vary_within_the_class(corpus):
    """Every caption states at least one fact of its picture that differs between pictures of its class, and
    every fact it states is true; the five references share a fact, so they agree on what the picture shows."""
    values = defaultdict(lambda: defaultdict(set))  # scene -> kind -> values over the class's pictures
    for s in corpus:
        for kind, value in fact_values(s.meta).items():
            values[s.label_name][kind].add(value)
    varying = {scene: {k for k, v in kinds.items() if len(v) > 1} for scene, kinds in values.items()}
    for s in corpus:
        stated = Counter()
        for caption in s.captions:
            assert caption[0].isupper() and caption.endswith(".") and "  " not in caption, caption
            found = claims(caption, s.label_name, s.meta)
            assert all(ok for _, ok in found), (caption, found, s.meta)
            kinds = {kind for kind, _ in found} & varying[s.label_name]
            assert kinds, (caption, found)
            stated.update(kinds)
        assert max(stated.values()) >= 3, (s.captions, stated)


def test_caption_side_words_are_mappable(corpus):
    sides = pytest.importorskip("spatialnet_dist.symmetry")  # the augmentation's side-word mapper
    named = [c for s in corpus for c in s.captions if SIDE.search(c.lower())]
    assert len(named) >= 100
    for caption in {c for s in corpus for c in s.captions}:
        assert sides.mappable(caption), caption


def test_class_oracle_is_clearly_below_reading_the_picture(corpus):
    """The class oracle (each test image gets the most frequent training caption of its class) scores clearly
    below one of the image's own references scored against the other four: the captions need the picture."""
    from pycocoevalcap.cider.cider import Cider

    def tokens(caption: str) -> str:
        return " ".join(words(caption))

    by_class = defaultdict(Counter)
    for s in corpus:
        if s.split == "train":
            by_class[s.label_name].update(map(tokens, s.captions))
    oracle = {name: min(c, key=lambda k: (-c[k], k)) for name, c in by_class.items()}
    test = [s for s in corpus if s.split == "test"]
    others = {s.image_id: [tokens(c) for c in s.captions[1:]] for s in test}
    oracle_score, _ = Cider().compute_score(others, {s.image_id: [oracle[s.label_name]] for s in test})
    own_score, _ = Cider().compute_score(others, {s.image_id: [tokens(s.captions[0])] for s in test})
    assert own_score >= 1.15 * oracle_score, (own_score, oracle_score)


def test_majority_answer_is_a_poor_guess(corpus):
    answers = defaultdict(Counter)
    for s in corpus:
        for q in s.qa:
            a = rsvqa_lr_count_bin(q["answer"]) if q["type"] == "count" else q["answer"]
            answers[q["type"]][a] += 1
    majority = {t: max(c.values()) / sum(c.values()) for t, c in answers.items()}
    for qtype in ("presence", "comp", "rural_urban", "position"):
        assert majority[qtype] <= 0.65, (qtype, answers[qtype])
    assert majority["count"] <= 0.5 and len(answers["count"]) == 3, answers["count"]  # 0, 1-10, 11-100
    assert Counter(s.label_name for s in corpus).most_common(1)[0][1] / len(corpus) <= 0.2  # majority class


def test_question_text_gives_no_answer_away(corpus):
    """Per type, guessing the most frequent answer that other images got for the same question text (the type's
    when the text is new) scores within 0.05 of guessing the type's most frequent answer. Scored over five folds
    of images, each guessed from the other four: val + test alone (120 images) put ~0.05 of noise on the gap."""
    folds = 5
    answer = {}  # qid -> answer class
    for s in corpus:
        for q in s.qa:
            answer[q["qid"]] = rsvqa_lr_count_bin(q["answer"]) if q["type"] == "count" else q["answer"]
    majority, question_only, asked = Counter(), Counter(), Counter()
    for fold in range(folds):
        by_text, by_type = defaultdict(Counter), defaultdict(Counter)
        for i, s in enumerate(corpus):
            if i % folds != fold:
                for q in s.qa:
                    by_text[q["question"]][answer[q["qid"]]] += 1
                    by_type[q["type"]][answer[q["qid"]]] += 1
        for i, s in enumerate(corpus):
            if i % folds == fold:
                for q in s.qa:
                    type_guess = by_type[q["type"]].most_common(1)[0][0]
                    text_guess = by_text[q["question"]].most_common(1)[0][0] if q["question"] in by_text else type_guess
                    asked[q["type"]] += 1
                    majority[q["type"]] += answer[q["qid"]] == type_guess
                    question_only[q["type"]] += answer[q["qid"]] == text_guess
    for qtype in QTYPES:
        assert asked[qtype] >= 300, asked
        gap = (question_only[qtype] - majority[qtype]) / asked[qtype]
        assert abs(gap) <= 0.05, (qtype, majority[qtype] / asked[qtype], question_only[qtype] / asked[qtype])


def test_write_synthetic_round_trip(tmp_path):
    root = str(tmp_path / "store")
    manifest = write_synthetic(root, images=20, seed=1)
    assert manifest["corpus"] == "synthetic" and manifest["classes"] == CLASSES and manifest["shuffle_seed"] == 1
    expected = {s.image_id: s for s in generate(20, 1)}
    assert manifest["tags"] == sorted({t for s in expected.values() for t in s.tags})
    splits = manifest["splits"]
    for split, info in splits.items():
        assert info["tag_counts"] == dict(sorted(Counter(t for s in expected.values() if s.split == split
                                                         for t in s.tags).items()))
    assert sum(sp["samples"] for sp in splits.values()) == 20
    assert [sh["samples"] for sh in splits["train"]["shards"]] == [1] * 16  # under MIN_SHARDS: one each
    seen = 0
    for split, info in splits.items():
        assert info["questions"] == sum(len(s.qa) for s in expected.values() if s.split == split)
        for shard in info["shards"]:
            members = defaultdict(dict)
            with tarfile.open(tmp_path / "store" / "synthetic" / split / shard["name"]) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    members[key][ext] = tar.extractfile(m).read()
            for key, sample_members in members.items():
                sample = decode_sample({"__key__": key, **sample_members})
                assert sample.record() == expected[key].record()
                assert np.array_equal(sample.image, expected[key].image)
                seen += 1
    assert seen == 20
