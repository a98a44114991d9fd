"""The evaluation's baselines on a hand-made training split whose answers are known, the shard record
reader they use, and the bootstrap intervals every score carries."""

from __future__ import annotations

import shutil
import tarfile

import numpy as np
import pytest

from spatialnet_dist.config import Config
from spatialnet_dist.data.vocab import build_vocabs
from spatialnet_dist.evaluate.run import trivial_baselines
from spatialnet_dist.metrics import bootstrap_interval
from spatialnet_dist.metrics.baselines import (
    class_oracle_captions,
    majority_answers,
    question_only_answers,
    read_training_text,
)
from spatialnet_dist.metrics.classification import score_classification
from spatialnet_dist.store.manifest import shard_urls
from spatialnet_dist.store.records import shard_records, split_records
from spatialnet_dist.store.schema import Sample
from spatialnet_dist.store.storage import StoreError
from spatialnet_dist.store.writer import ShardWriter

CLASSES = ["beach", "farm", "forest"]
TRAIN = [  # (class, captions, [(question, type, answer)])
    ("beach", ["Sand and sea", "a beach"], [("How many boats are there?", "count", 3), ("Is there a road?", "presence", "no")]),
    ("beach", ["sand  and sea."], [("How many boats are there?", "count", "5"), ("Is there a road?", "presence", "no")]),
    ("farm", ["green fields"], [("Is there a river?", "presence", "yes"), ("How many houses are there?", "count", 200)]),
    ("farm", ["A farm"], [("Is there a river?", "presence", "yes"), ("Is there a building?", "presence", "yes")]),
]
# Per type: presence yes 3 / no 2 -> "yes"; count (RSVQA-LR bins) "between 0 and 10" 2 / "between 100 and 1000" 1.


def sample(split: str, i: int, label: str, captions: list[str], qa: list[tuple]) -> Sample:
    return Sample(
        corpus="toy", image_id=f"{split}_{i}", split=split,
        image=np.full((8, 8, 3), 40 * i, np.uint8),
        label=CLASSES.index(label), label_name=label, captions=captions,
        qa=[{"qid": f"{split}{i}q{j}", "question": q, "type": t, "answer": a} for j, (q, t, a) in enumerate(qa)],
    )


def write_toy(root: str) -> None:
    with ShardWriter(root, "toy", classes=CLASSES, shard_size=3, min_shards=1) as w:
        for i, (label, captions, qa) in enumerate(TRAIN):
            w.write(sample("train", i, label, captions, qa))
        w.write(sample("test", 0, "beach", ["a beach"], [("Is there a road?", "presence", "yes")]))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    write_toy(root)
    cfg = Config()
    cfg.data.root = root
    for task in ("captioning", "vqa", "regression", "classification"):
        getattr(cfg.tasks, task).corpora = ["toy"]
    return cfg


def question(qid: str, text: str, qtype: str, answer) -> dict:
    """A VQA prediction record, its question as the model read it (the baseline normalises it again)."""
    return {"qid": qid, "question": text, "type": qtype, "answer": answer, "prediction": "no", "image_id": "x"}


TEST_QUESTIONS = [
    question("1", "is there a road", "presence", "no"),  # asked in training: "no" twice
    question("2", "how many houses are there", "count", 300),  # asked once in training: 200
    question("3", "is there a lake", "presence", "yes"),  # never asked: the type's majority
    question("4", "Is there a ROAD?", "presence", "yes"),  # the same question as "1" once normalised
]


def test_question_only_takes_the_questions_majority_and_falls_back_to_the_type(cfg):
    vocabs = build_vocabs(cfg)
    text = read_training_text(cfg, vocabs, answers=["vqa"], questions=["vqa"])
    assert majority_answers(TEST_QUESTIONS, text) == ["yes", "between 0 and 10", "yes", "yes"]
    answers = question_only_answers(TEST_QUESTIONS, text, vocabs, cfg.model.question_max_len)
    assert answers == ["no", "between 100 and 1000", "yes", "no"]
    assert text.captions_by_class == {}  # captioning not asked for: no caption read


def test_vqa_baselines_are_scored_by_the_vqa_metric(cfg):
    baselines = trivial_baselines({"vqa": TEST_QUESTIONS}, cfg, build_vocabs(cfg))
    vqa = baselines["vqa"]
    assert vqa["majority"]["per_type"] == {"count": 0.0, "presence": 2 / 3}
    assert vqa["question_only"]["per_type"] == {"count": 1.0, "presence": 2 / 3}
    assert vqa["question_only"]["OA"] == 3 / 4 and vqa["question_only"]["AA"] == pytest.approx(5 / 6)
    assert vqa["question_only"]["name"] == "most frequent training answer to the question"
    lo, hi = vqa["question_only"]["OA_ci"]
    assert lo <= 3 / 4 <= hi


def test_class_oracle_gives_each_image_its_class_most_frequent_training_caption(cfg):
    text = read_training_text(cfg, build_vocabs(cfg), captions=["captioning"])
    rows = [
        {"image_id": "b", "label_name": "beach", "references": ["x"]},
        {"image_id": "f", "label_name": "farm", "references": ["x"]},  # "green fields" 1, "a farm" 1: a tie
        {"image_id": "w", "label_name": "forest", "references": ["x"]},  # no training caption of its class
    ]
    assert class_oracle_captions(rows, text) == [
        {"image_id": "b", "caption": "sand and sea"},  # "Sand and sea" and "sand  and sea." count as one
        {"image_id": "f", "caption": "a farm"},  # ties go to the alphabetically first
        {"image_id": "w", "caption": "sand and sea"},  # the most frequent training caption of all
    ]
    assert text.answers_by_question == {}


def test_fixed_caption_and_majority_class_come_from_the_training_split(tmp_path, monkeypatch):
    """Training: beach 3 of 4 images, "sand and sea" 2 of 4 captions; the test split: farm 2 of 3, "green fields"
    3 of its 4 references. The baselines guess the training split's, scored on the test split's images."""
    import spatialnet_dist.tasks.captioning as captioning

    split_of = {"train": [("beach", ["Sand and sea."]), ("beach", ["sand and sea"]), ("beach", ["a beach"]),
                          ("farm", ["green fields"])],
                "test": [("farm", ["green fields", "green fields"]), ("farm", ["green fields"]),
                         ("beach", ["sand and sea"])]}
    with ShardWriter(str(tmp_path), "toy", classes=CLASSES, shard_size=3, min_shards=1) as w:
        for split, items in split_of.items():
            for i, (label, captions) in enumerate(items):
                w.write(sample(split, i, label, captions, []))
    cfg = Config()
    cfg.data.root = str(tmp_path)
    cfg.tasks.vqa.enabled = cfg.tasks.regression.enabled = False
    cfg.tasks.captioning.corpora = cfg.tasks.classification.corpora = ["toy"]
    vocabs = build_vocabs(cfg)
    scored = []  # the captions each baseline gives (METEOR's java is slow: the scorer is test_evaluate.py's)
    monkeypatch.setattr(captioning, "score_captions", lambda preds, refs: scored.append(preds) or {"CIDEr": 0.0})
    test = [(f"test_{i}", label, captions) for i, (label, captions) in enumerate(split_of["test"])]
    rows = {"captioning": [{"image_id": i, "references": refs, "label_name": label} for i, label, refs in test],
            "classification": [{"image_id": i, "label": CLASSES.index(label), "prediction": 0} for i, label, _ in test]}
    baselines = trivial_baselines(rows, cfg, vocabs)
    assert baselines["classification"] == {"majority": {"accuracy": 1 / 3, "n": 3,  # not farm's 2 / 3
                                                        "name": "most frequent training class: beach"}}
    assert baselines["captioning"]["fixed_caption"]["name"] == "most frequent training caption: 'sand and sea'"
    assert scored[0] == [{"image_id": i, "caption": "sand and sea"} for i, _, _ in test]  # not "green fields"


def test_shard_records_skip_images_and_name_a_bad_shard(tmp_path):
    write_toy(str(tmp_path))
    records = list(split_records(str(tmp_path), "toy", "train"))
    by_id = {r["image_id"]: r for r in records}  # the writer shuffles: compare by id
    assert sorted(by_id) == ["train_0", "train_1", "train_2", "train_3"] and len(records) == 4
    assert all("image" not in r for r in records) and by_id["train_2"]["qa"][1]["answer"] == 200
    first = shard_urls(str(tmp_path), "toy", "train")[0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(first, "rb").read()[:700])  # inside the first sample's members
    with pytest.raises(StoreError, match="cut.tar"):
        list(shard_records(str(cut)))

    members = list(tarfile.open(first))  # a tar that ends cleanly after its first sample
    with tarfile.open(cut, "w") as short, tarfile.open(first) as full:
        for member in members[:2]:
            short.addfile(member, full.extractfile(member))
    shutil.copy(cut, first)
    with pytest.raises(StoreError, match=r"toy-train-[0-9a-f]{8}-000000.tar: 1 sample\(s\) in the tar, the manifest lists 2"):
        list(split_records(str(tmp_path), "toy", "train"))


def test_bootstrap_interval_holds_the_estimate_repeats_and_narrows():
    rng = np.random.default_rng(1)
    small, large = rng.random(50) < 0.7, rng.random(5000) < 0.7

    def interval(correct, seed=0):
        return bootstrap_interval(lambda idx: correct[idx].mean(1), len(correct), seed=seed)

    for correct in (small, large):
        lo, hi = interval(correct)
        assert lo <= correct.mean() <= hi and lo < hi
    assert interval(small) == interval(small)  # fixed seed: the same interval every run
    scores = rng.random(50)  # continuous: two seeds' percentiles differ
    assert interval(scores, seed=1) != interval(scores)
    assert np.diff(interval(large)) < np.diff(interval(small)) / 5  # ~sqrt(100) narrower


def test_bootstrap_interval_in_chunks_is_the_whole_draw(monkeypatch):
    import spatialnet_dist.metrics as metrics

    values = np.random.default_rng(2).random(300)
    whole = bootstrap_interval(lambda idx: values[idx].mean(1), len(values), resamples=100)
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK", 300 * 7)  # 7 resamples at a time, the last 2
    assert bootstrap_interval(lambda idx: values[idx].mean(1), len(values), resamples=100) == whole


def test_classification_accuracy_carries_its_interval():
    scores = score_classification([0, 1, 1, 2, 0] * 20, [0, 1, 2, 2, 2] * 20, ["beach", "farm", "port"])
    lo, hi = scores["accuracy_ci"]
    assert lo < scores["accuracy"] == 0.6 < hi and hi - lo < 0.3
