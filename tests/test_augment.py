"""Augmentation keeps every label true: side words move with the pixels, unclear texts keep the image as it is,
strong augmentation only where no label counts or describes objects, none in evaluation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from spatialnet_dist.batch_format import CAPTIONS, QUESTIONS
from spatialnet_dist.config import ConfigError, load
from spatialnet_dist.data.streams import TaskSamples
from spatialnet_dist.data.transforms import (
    ERASE_AREA,
    TRIVIAL_MAX,
    TRIVIAL_OPS,
    ImageTransform,
    erase_,
    task_transform,
    trivial_op,
)
from spatialnet_dist.store.schema import Sample
from spatialnet_dist.symmetry import IDENTITY, SIDE_WORDS, SYMMETRIES, Symmetry, map_sides, mappable
from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS
from spatialnet_dist.text import AnswerVocab, TextVocabs, Vocab, words

MARKED = 5  # side of the marker images: no resize, so a pixel stays a pixel
CENTRE = MARKED // 2
SYMMETRY = ImageTransform(MARKED, 1, augment="symmetry")


def marked(direction: tuple[int, int]) -> np.ndarray:
    """(5, 5, 1) black with one white pixel at the edge of the image in `direction` (dx right, dy down)."""
    image = np.zeros((MARKED, MARKED, 1), np.uint8)
    image[CENTRE + CENTRE * direction[1], CENTRE + CENTRE * direction[0]] = 255
    return image


def marker_direction(x: torch.Tensor) -> tuple[int, int]:
    """(C, 5, 5) -> where the brightest pixel lies, seen from the centre: (sign dx, sign dy)."""
    row, col = divmod(int(x[0].argmax()), MARKED)
    return int(np.sign(col - CENTRE)), int(np.sign(row - CENTRE))


def test_a_mirror_swaps_left_and_right_and_keeps_top_and_bottom():
    mirror = Symmetry(0, mirrored=True)
    assert map_sides("Is there water on the left side of the image?", mirror) == \
        "is there water on the right side of the image"
    assert map_sides("a road at the top of the image and fields to its right", mirror) == \
        "a road at the top of the image and fields to its left"
    assert map_sides("the north-western part, the easternmost field", mirror) == "the north eastern part the westernmost field"
    assert map_sides("cars drive clockwise", mirror) == "cars drive counterclockwise"
    assert map_sides("a vertical runway", mirror) == "a vertical runway"
    assert map_sides("How many cars are there?", mirror) == "How many cars are there?"  # no side: untouched
    assert marker_direction(SYMMETRY(marked((-1, 0)), None, mirror)) == (1, 0)  # the pixels agree


@pytest.mark.parametrize("symmetry", SYMMETRIES)
def test_every_symmetry_maps_each_side_word_where_its_pixel_moves(symmetry):
    for word, side in SIDE_WORDS.items():
        if side.axis:
            continue
        moved = marker_direction(SYMMETRY(marked(side.direction), None, symmetry))
        mapped = map_sides(word, symmetry)
        assert SIDE_WORDS[mapped].direction == moved and mapped in side.family.values(), (word, mapped)
    for corner in ((-1, -1), (1, -1), (-1, 1), (1, 1)):  # "top left", "lower right", "north east", ...
        moved = marker_direction(SYMMETRY(marked(corner), None, symmetry))
        for family in ({(0, -1): "top", (0, 1): "bottom", (-1, 0): "left", (1, 0): "right"},
                       {(0, -1): "upper", (0, 1): "lower", (-1, 0): "left", (1, 0): "right"},
                       {(0, -1): "north", (0, 1): "south", (-1, 0): "west", (1, 0): "east"}):
            phrase = f"the {family[(0, corner[1])]}-{family[(corner[0], 0)]} corner"
            vertical, horizontal = (SIDE_WORDS[w].direction for w in words(map_sides(phrase, symmetry))[1:3])
            assert (horizontal[0], vertical[1]) == moved and vertical[0] == horizontal[1] == 0, phrase
    line = np.zeros((MARKED, MARKED, 1), np.uint8)
    line[CENTRE] = 255  # a horizontal line through the centre
    horizontal = bool(SYMMETRY(line, None, symmetry)[0, CENTRE].gt(0).all())
    assert map_sides("a horizontal road", symmetry) == f"a {'horizontal' if horizontal else 'vertical'} road"
    assert map_sides("it runs vertically", symmetry) == f"it runs {'vertically' if horizontal else 'horizontally'}"


def _vocabs(texts: list[str], answers: list[str]) -> TextVocabs:
    return TextVocabs(Vocab.build(Counter(words(" ".join([*texts, *SIDE_WORDS])))), AnswerVocab(answers, "exact"), [])


def _side_of(ids: torch.Tensor, vocabs: TextVocabs) -> tuple[int, int] | None:
    """The direction of the side word of an encoded text (None without one)."""
    sides = [SIDE_WORDS[w].direction for w in vocabs.words.decode(ids).split() if w in SIDE_WORDS]
    assert len(sides) <= 1
    return sides[0] if sides else None


def test_one_symmetry_per_visit_moves_the_image_and_every_text_alike():
    caption = "water on the left side"
    qa = [{"qid": "q0", "question": "Is there water on the left side of the image?", "answer": "yes", "type": "presence"},
          {"qid": "q1", "question": "Which side of the image is the water on?", "answer": "left", "type": "position"},
          {"qid": "q2", "question": "How many ponds are in the left half?", "answer": 1, "type": "count"}]
    sample = Sample("toy", "i0", "train", marked((-1, 0)), captions=[caption], qa=qa)
    vocabs = _vocabs([caption] + [q["question"] for q in qa], ["yes", "left", "right", "top", "bottom"])
    seen = set()
    for task in ("captioning", "vqa", "regression"):
        rows = TaskSamples(task, vocabs, SYMMETRY, 24, 20, train=True)
        rng = np.random.default_rng(0)
        for _ in range(40):
            row = rows(sample, rng)
            where = marker_direction(row["image"])
            seen.add(where)
            for text in row[CAPTIONS if task == "captioning" else QUESTIONS]:  # a visit reads all its texts
                side = _side_of(text["tokens"] if task == "captioning" else text["question"], vocabs)
                if task == "vqa" and text["qid"] == "q1":  # the answer names the side
                    assert side is None
                    side = SIDE_WORDS[vocabs.answers.decode(text["answer"])].direction
                    assert SIDE_WORDS[text["answer_raw"]].direction == side
                assert side == where
        assert rows.unaugmented == 0
    assert seen == {(-1, 0), (1, 0), (0, -1), (0, 1)}


def test_a_side_word_that_names_no_side_keeps_the_visit_unaugmented():
    unclear = ["cars on top of the building", "the bottom of the river", "a lake lower than the road",
               "a car is left on the road", "roads meet at right angles", "right next to the river",
               "the right-hand side", "a bridge above the river", "houses below the hill"]
    clear = ["is there water on the left side of the image?", "is there a road at the top of the image?",
             "a house in the top-left corner", "the upper half", "to the right of the road", "from left to right",
             "the northernmost field", "left", "how many cars are there?"]
    assert not any(map(mappable, unclear)) and all(map(mappable, clear))
    with pytest.raises(ValueError, match="on top of"):
        map_sides(unclear[0], Symmetry(1))
    assert map_sides(unclear[0], IDENTITY) == unclear[0]

    qa = [{"qid": "q0", "question": "Are there cars on top of the building?", "answer": "yes", "type": "presence"},
          {"qid": "q1", "question": "Is there water on the left side of the image?", "answer": "yes", "type": "presence"}]
    sample = Sample("toy", "i0", "train", marked((-1, 0)), qa=qa)
    vocabs = _vocabs([q["question"] for q in qa], ["yes", "no"])
    rows = TaskSamples("vqa", vocabs, SYMMETRY, 24, 20, train=True)
    rng, plain = np.random.default_rng(0), SYMMETRY(sample.image)
    visits = [rows(sample, rng) for _ in range(40)]
    assert all(torch.equal(row["image"], plain) for row in visits)  # even for the clear question q1
    left = torch.tensor(vocabs.words.encode(qa[1]["question"], 20, bos_eos=False))
    asked = [q for row in visits for q in row[QUESTIONS] if q["qid"] == "q1"]
    assert len(asked) == 40 and all(torch.equal(q["question"], left) for q in asked)
    assert 30 <= rows.unaugmented < 40  # every visit that drew a symmetry other than the identity (7 in 8)


def test_strong_policy_changes_pixels_keeps_shape_and_dtype_and_is_deterministic():
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    image.flags.writeable = False  # as the image cache holds it
    before = image.copy()
    strong = ImageTransform(32, 3, augment="strong")

    def augmented(seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        return strong(image, rng, strong.draw_symmetry(rng))

    plain = ImageTransform(32, 3)(image)
    outputs = [augmented(seed) for seed in range(8)]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in outputs)
    assert all(not torch.allclose(x, s.apply(plain)) for x in outputs for s in SYMMETRIES)  # cropped, jittered
    assert torch.equal(augmented(3), outputs[3]) and not torch.equal(outputs[3], outputs[4])
    assert np.array_equal(image, before)


def test_trivial_ops_do_what_they_say_on_any_number_of_bands():
    """Each TrivialAugment op on a 13-band float image: strength 0 is the identity; a rotation by a quarter
    (strength 0.5 of 180 degrees) is the square's quarter turn, pixel for pixel; brightness adds, contrast
    keeps the mean, band gain scales each band, a translation moves the content by the fraction asked."""
    x = torch.randn(13, 8, 8, generator=torch.Generator().manual_seed(0))
    for op in TRIVIAL_OPS:
        torch.testing.assert_close(trivial_op(x, op, 0.0), x, atol=1e-5, rtol=0)
    turned = trivial_op(x, "rotate", 0.5)
    assert any(torch.allclose(turned, torch.rot90(x, k, dims=(1, 2)), atol=1e-5) for k in (1, 3))
    torch.testing.assert_close(trivial_op(x, "brightness", -0.5), x - 0.5 * TRIVIAL_MAX["brightness"])
    contrast = trivial_op(x, "contrast", 1.0)
    assert torch.isclose(contrast.mean(), x.mean(), atol=1e-5) and contrast.std() > 1.5 * x.std()
    gains = trivial_op(x, "band_gain", 1.0) / x
    assert torch.allclose(gains[0], torch.tensor(1 + TRIVIAL_MAX["band_gain"])) and gains[-1].mean() < 1
    shifted = trivial_op(x, "translate_x", 0.25 / TRIVIAL_MAX["translate_x"])  # a quarter of the side: 2 pixels
    torch.testing.assert_close(shifted[:, :, :6], x[:, :, 2:], atol=1e-5, rtol=0)
    assert trivial_op(x, "sharpness", -1.0).std() < x.std()  # blurred


def test_trivial_policy_is_deterministic_per_rng_and_keeps_shape_and_dtype():
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    trivial = ImageTransform(32, 3, augment="trivial")

    def augmented(seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        return trivial(image, rng, trivial.draw_symmetry(rng))

    outputs = [augmented(seed) for seed in range(8)]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in outputs)
    assert torch.equal(augmented(3), outputs[3]) and not torch.equal(outputs[3], outputs[4])


def test_random_erasing_replaces_one_box_of_the_allowed_area():
    x = torch.full((4, 32, 32), 5.0)
    erase_(x, np.random.default_rng(1))
    changed = (x != 5.0).all(dim=0)  # (32, 32): noise is never exactly 5
    rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert int(changed.sum()) == int(box)  # one rectangle
    assert ERASE_AREA[0] * 0.8 <= float(box) / 32**2 <= ERASE_AREA[1] * 1.2
    erased = [ImageTransform(16, 3, "strong", erase_prob=p) for p in (0.0, 1.0)]
    image = np.full((16, 16, 3), 128, np.uint8)
    plain, with_box = (t(image, np.random.default_rng(0)) for t in erased)
    assert not torch.equal(plain, with_box)


def test_counting_and_describing_tasks_may_not_crop():
    cfg = load()
    assert {t: getattr(cfg.tasks, t).augment for t in TASKS} == {
        "captioning": "symmetry", "vqa": "symmetry", "classification": "strong", "regression": "symmetry"}
    for task in ("vqa", "regression", "captioning"):
        for policy in ("strong", "trivial"):
            with pytest.raises(ConfigError, match=f"tasks.{task}.augment: {policy}"):
                load(overrides=[f"tasks.{task}.augment={policy}"])
    with pytest.raises(ConfigError, match="tasks.classification.erase_prob: erasing goes with augment"):
        load(overrides=["tasks.classification.augment=symmetry", "tasks.classification.erase_prob=0.25"])
    with pytest.raises(ConfigError, match="tasks.classification.erase_prob: 1.5"):
        load(overrides=["tasks.classification.erase_prob=1.5"])
    assert task_transform(load(overrides=["tasks.classification.augment=trivial", "tasks.classification.erase_prob=0.25"]),
                          "classification", train=True).erase_prob == 0.25
    with pytest.raises(ConfigError, match="tasks.vqa.augment: 'crop'"):
        load(overrides=["tasks.vqa.augment=crop"])
    assert load(overrides=["tasks.classification.augment=none"]).tasks.classification.augment == "none"


def test_evaluation_never_augments():
    cfg = load(overrides=["model.image_size=32"])
    assert [task_transform(cfg, t, train=False).augment for t in TASKS] == ["none"] * len(TASKS)
    assert task_transform(cfg, "classification", train=True) == ImageTransform(32, 3, augment="strong")
    sample = Sample("toy", "i0", "test", marked((0, -1)), label=0, label_name="water",
                    qa=[{"qid": "q0", "question": "Is there water at the top of the image?", "answer": "yes",
                         "type": "presence"}])
    vocabs = TextVocabs(_vocabs([sample.qa[0]["question"]], ["yes"]).words, AnswerVocab(["yes"], "exact"), ["water"])
    for task in ("classification", "vqa"):
        row = TaskSamples(task, vocabs, task_transform(cfg, task, train=False), 24, 20, train=False)(sample, None)
        assert torch.equal(row["image"], ImageTransform(32, 3)(sample.image))
