"""Data: vocabularies, transforms, per-task streams and the train/eval loaders, on tiny shard stores."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from spatialnet_dist.batch_format import CAPTIONS, IMAGES, QUESTIONS, collate, task_images
from spatialnet_dist.config import Config
from spatialnet_dist.data import train_rows
from spatialnet_dist.data.batches import make_eval_loader, make_train_loader
from spatialnet_dist.data.indexed import ShardReader
from spatialnet_dist.data.order import TaskOrder, alternate_task
from spatialnet_dist.data.streams import (
    MAX_QUESTIONS_PER_VISIT,
    ImageCache,
    StreamCounts,
    TaskSamples,
    decode_samples,
    read_shards,
    task_stream_spec,
)
from spatialnet_dist.data.train_rows import TaskRows
from spatialnet_dist.data.transforms import ImageTransform, adapt_bands
from spatialnet_dist.data.vocab import build_vocabs
from spatialnet_dist.errors import UserError
from spatialnet_dist.store import schema
from spatialnet_dist.store.manifest import shard_urls
from spatialnet_dist.store.schema import Sample
from spatialnet_dist.store.storage import StoreError
from spatialnet_dist.store.writer import ShardWriter
from spatialnet_dist.symmetry import SYMMETRIES, draw_symmetry
from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS
from spatialnet_dist.text import rsvqa_lr_count_bin

CLASSES = ["field", "forest", "water"]
SIZE = 32  # model input size in these tests


def make_samples(corpus: str, split: str, n: int, seed: int = 0, classes: bool = True) -> list[Sample]:
    """Small images; every one with 2 captions, a count and a presence question, and a label."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        iid = f"{corpus}_{split}_{i}"
        qa = [
            {"qid": f"{iid}_q0", "question": "How many cars are there?", "answer": int(rng.integers(0, 30)), "type": "count"},
            {"qid": f"{iid}_q1", "question": "Is there a river?", "answer": ["yes", "no"][i % 2], "type": "presence"},
        ]
        out.append(
            Sample(
                corpus, iid, split, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                label=i % 3 if classes else None, label_name=CLASSES[i % 3] if classes else None,
                captions=[f"a {CLASSES[i % 3]} scene number {i}", f"many {CLASSES[i % 3]} pixels"], qa=qa,
            )
        )
    return out


def write_corpus(root: str, corpus: str, splits: dict[str, int], shard_size: int, seed: int = 0, classes: bool = True):
    # min_shards=1: the layouts these tests need (shard_size samples per shard, fewer shards than readers)
    with ShardWriter(root, corpus, classes=CLASSES if classes else None, shard_size=shard_size, min_shards=1) as w:
        for split, n in splits.items():
            for s in make_samples(corpus, split, n, seed, classes):
                w.write(s)


def make_cfg(root: str, corpora: list[str], workers: int = 0, batch_size: int = 4) -> Config:
    cfg = Config()
    cfg.data.root = str(root)
    cfg.data.loader_workers = workers
    cfg.model.image_size = SIZE
    for task in TASKS:
        getattr(cfg.tasks, task).corpora = list(corpora)
        getattr(cfg.tasks, task).batch_size = batch_size
    return cfg


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocked DataLoader in the main thread."""

    def boom(*_):
        raise TimeoutError(f"no result within {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def take(loader, steps: int) -> list[dict]:
    try:
        with deadline(60):
            return [next(loader) for _ in range(steps)]
    finally:
        loader.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """'toy': 2 train shards (fewer than 2 ranks x 2 workers), 3 test shards; 'big': 4x the samples of 'toy'."""
    root = str(tmp_path_factory.mktemp("store"))
    write_corpus(root, "toy", {"train": 16, "test": 20}, shard_size=8)
    write_corpus(root, "big", {"train": 64}, shard_size=16, seed=1)
    return root


@pytest.fixture(scope="module")
def vocabs(store):
    return build_vocabs(make_cfg(store, ["toy"]))


# ---- vocabularies ----


def test_vocabs_come_from_train_manifests(tmp_path):
    write_corpus(str(tmp_path), "other", {"train": 4}, shard_size=4, seed=3)
    with ShardWriter(str(tmp_path), "more", classes=["water", "desert"], shard_size=4) as w:
        w.write(Sample("more", "m0", "train", np.zeros((8, 8, 3), np.uint8), label=1, label_name="desert", captions=["sand"]))
    cfg = make_cfg(tmp_path, ["other"])
    cfg.tasks.classification.corpora = ["other", "more"]
    cfg.tasks.captioning.corpora = ["other", "more"]
    v = build_vocabs(cfg)
    assert v.classes == ["field", "forest", "water", "desert"]  # union, first corpus first
    assert {"scene", "cars", "river", "sand"} <= set(v.words.itos)
    assert "3" in v.words.itos and "4" not in v.words.itos  # train split only: 'other' has images 0..3
    counts = [q["answer"] for s in make_samples("other", "train", 4, seed=3) for q in s.qa if q["type"] == "count"]
    assert set(v.answers.itos) == {"yes", "no"} | {rsvqa_lr_count_bin(a) for a in counts}  # the answer rule applied
    cfg.model.min_word_count = 4  # 'scene' is in every caption, 'sand' once
    rare = build_vocabs(cfg)
    assert "scene" in rare.words.itos and "sand" not in rare.words.itos


def test_classification_corpus_without_classes_is_a_user_error(tmp_path):
    write_corpus(str(tmp_path), "nolabels", {"train": 4}, shard_size=4, classes=False)
    cfg = make_cfg(tmp_path, ["nolabels"])
    with pytest.raises(UserError, match="nolabels"):
        build_vocabs(cfg)


# ---- transforms ----


def test_transform_normalises_resizes_and_adapts_bands():
    rgb = np.full((20, 24, 3), 255, np.uint8)
    x = ImageTransform(SIZE, 3)(rgb)
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))  # 255 -> 1 after /255, -0.5, /0.5

    multi = np.random.default_rng(0).integers(0, 4000, (16, 16, 6)).astype(np.uint16)
    multi[:, :, 1] += 10000  # a different range per band: standardised per band
    y = ImageTransform(SIZE, 4)(multi)
    assert y.shape == (4, SIZE, SIZE)
    assert torch.allclose(y.mean(dim=(1, 2)), torch.zeros(4), atol=0.05)

    grey = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16, 1)
    z = ImageTransform(16, 3)(grey)
    assert torch.equal(z[0], z[1]) and torch.equal(z[1], z[2])
    assert adapt_bands(np.zeros((2, 2, 2)), 3).shape == (2, 2, 3)


def test_augmentations_move_pixels_but_keep_them_all():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 12, 12), dtype=np.uint8))  # (C, H, W)

    def pixels(x):
        return sorted(map(tuple, x.reshape(3, -1).T.tolist()))

    seen = set()
    for _ in range(64):
        out = draw_symmetry(rng).apply(image)
        assert pixels(out) == pixels(image)  # nothing created, nothing lost: counts and presence stay true
        seen.add(out.numpy().tobytes())
    assert len(seen) == 8  # the 8 symmetries of the square, all reachable
    image = image.permute(1, 2, 0).numpy()  # (H, W, C) as stored
    transform = ImageTransform(SIZE, 3, augment="symmetry")

    def augmented(seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        return transform(image, rng, transform.draw_symmetry(rng))

    assert torch.equal(augmented(5), augmented(5))


# ---- training loader ----


def test_two_ranks_two_workers_fewer_shards_get_full_batches(store, vocabs):
    cfg = make_cfg(store, ["toy"], workers=2, batch_size=3)
    cfg.tasks.vqa.batch_size = 5
    ids = {}
    for rank in range(2):
        loader = make_train_loader(cfg, vocabs, rank, 2)
        batches = take(loader, 4)
        assert loader.skipped == dict.fromkeys(TASKS, 0)
        for batch in batches:
            assert set(batch) == {IMAGES, *TASKS}
            for task in TASKS:
                n = 5 if task == "vqa" else 3
                assert task_images(batch, task).shape == (n, 3, SIZE, SIZE) and len(batch[task]["image_id"]) == n
            # every toy image has 2 captions: a visit trains both against its one image
            assert batch["captioning"]["tokens"].shape == (6, cfg.model.caption_max_len)
            assert batch["captioning"]["image_index"].tolist() == [0, 0, 1, 1, 2, 2]
            # every toy image has 2 questions, one of them a count question: all answered in one visit
            assert batch["vqa"]["question"].shape == (10, cfg.model.question_max_len)
            assert batch["vqa"]["image_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
            assert batch["regression"]["image_index"].tolist() == [0, 1, 2]
            assert batch["vqa"]["answer"].dtype == torch.int64 and batch["regression"]["count"].dtype == torch.float32
            labels = [int(i.rsplit("_", 1)[1]) % 3 for i in batch["classification"]["image_id"]]  # as make_samples
            assert batch["classification"]["label"].tolist() == labels
        ids[rank] = [i for b in batches for i in b["vqa"]["image_id"]]
    assert not set(ids[0][:5]) & set(ids[1][:5])  # micro-batch 0: the ranks' slices of one permutation


def _fingerprint(batches: list[dict]) -> list:
    return [(t, b[t]["image_id"], task_images(b, t).sum().item()) for b in batches for t in b if t != IMAGES]


def test_batches_are_deterministic_for_a_seed_and_vary_with_it(store, vocabs):
    cfg = make_cfg(store, ["toy"], workers=0)
    first = _fingerprint(take(make_train_loader(cfg, vocabs, 0, 1), 3))
    assert first == _fingerprint(take(make_train_loader(cfg, vocabs, 0, 1), 3))
    cfg.run.seed = 1
    assert first != _fingerprint(take(make_train_loader(cfg, vocabs, 0, 1), 3))


def test_only_classification_rows_are_cropped_and_evaluation_rows_are_plain(store, vocabs):
    cfg = make_cfg(store, ["toy"])  # the default policies: classification strong, the others symmetry
    plain = ImageTransform(SIZE, 3)
    images = {s.image_id: plain(s.image) for split, n in (("train", 16), ("test", 20)) for s in make_samples("toy", split, n)}

    def symmetric(x: torch.Tensor, image_id: str) -> bool:
        return any(torch.equal(x, s.apply(images[image_id])) for s in SYMMETRIES)

    for batch in take(make_train_loader(cfg, vocabs, 0, 1), 3):
        for task in TASKS:
            kept = [symmetric(x, i) for x, i in zip(task_images(batch, task), batch[task]["image_id"], strict=True)]
            assert all(kept) if task != "classification" else not any(kept), task  # counts never see a crop
    for task in ("classification", "regression"):
        for sub in make_eval_loader(cfg, vocabs, task, "test", 0, 1):
            assert all(torch.equal(x, images[i]) for x, i in zip(sub["image"], sub["image_id"], strict=True))


def _rows(cfg, vocabs, task: str, n: int, seed: int = 7) -> list[dict]:
    spec = task_stream_spec(cfg, vocabs, task, "train", ImageTransform(SIZE, 3, augment="symmetry"), train=True)
    rows = TaskRows(spec, seed, ShardReader())
    return [rows.row(g) for g in range(n)]


def test_image_cache_decodes_each_image_once_and_changes_no_row(store, vocabs, monkeypatch):
    cfg = make_cfg(store, ["toy"])
    spec = task_stream_spec(cfg, vocabs, "vqa", "train", ImageTransform(SIZE, 3, augment="symmetry"), train=True)
    decodes = Counter()
    decode_image = schema.decode_image
    monkeypatch.setattr(schema, "decode_image", lambda ext, data: decodes.update([ext]) or decode_image(ext, data))

    def rows(images: ImageCache | None, n: int = 100) -> list[dict]:
        rows = TaskRows(spec, 7, ShardReader(), images)
        return [rows.row(g) for g in range(n)]

    plain = rows(None)
    assert decodes.total() >= 100  # one decode per visit
    decodes.clear()
    images = ImageCache(2**30)
    cached = rows(images)
    assert decodes.total() == len(images) == 16  # toy's train split: 16 images, each decoded once
    assert all(_qids(a) == _qids(b) and torch.equal(a["image"], b["image"]) for a, b in zip(plain, cached, strict=True))
    with pytest.raises(ValueError, match="read-only"):
        next(iter(images._images.values()))[0, 0, 0] = 1

    one_image = next(iter(images._images.values())).nbytes
    small = ImageCache(3 * one_image)
    rows(small, 50)
    assert len(small) == 3 and small.bytes <= small.max_bytes


def _qids(row: dict) -> list[str]:
    return [q["qid"] for q in row[QUESTIONS]]


def test_vqa_visits_draw_every_pair_and_captions_vary(store, vocabs):
    cfg = make_cfg(store, ["toy"])
    cfg.tasks.vqa.questions_per_image = 1  # one of the 2 questions per visit: the visits still reach all
    rows = _rows(cfg, vocabs, "vqa", 400)
    assert all(len(row[QUESTIONS]) == 1 for row in rows)
    assert {q for row in rows for q in _qids(row)} == {f"toy_train_{i}_q{k}" for i in range(16) for k in range(2)}
    cfg.tasks.captioning.captions_per_image = 1  # likewise one of the 2 captions per visit
    rows = _rows(cfg, vocabs, "captioning", 200)
    assert all(len(row[CAPTIONS]) == 1 for row in rows)
    drawn = {(row["image_id"], tuple(c["tokens"].tolist())) for row in rows for c in row[CAPTIONS]}
    assert len(drawn) == 32  # both captions of every image


def _many_questions(image_id: str, n: int) -> Sample:
    """An image with n questions, counts 0..n-1 (qid <image_id>_q<k>, answer k), every other one a count question."""
    qa = [{"qid": f"{image_id}_q{k}", "question": "How many cars are there?" if k % 2 else "Is there a river?",
           "answer": k if k % 2 else "yes", "type": "count" if k % 2 else "presence"} for k in range(n)]
    return Sample("toy", image_id, "train", np.zeros((16, 16, 3), np.uint8), qa=qa)


@pytest.mark.parametrize("per_image", [0, 1, 4, 16])
def test_a_visit_answers_min_k_n_distinct_questions_each_mapped_to_its_image(vocabs, per_image):
    make_row = TaskSamples("vqa", vocabs, ImageTransform(SIZE, 3, augment="symmetry"), 24, 8, train=True,
                           per_visit=per_image)
    rng = np.random.default_rng(0)
    samples = [_many_questions("a", 10), _many_questions("b", 3), _many_questions("c", MAX_QUESTIONS_PER_VISIT + 6)]
    rows = [make_row(s, rng) for s in samples]
    k = per_image or MAX_QUESTIONS_PER_VISIT
    assert [len(set(_qids(row))) for row in rows] == [min(k, 10), min(k, 3), min(k, MAX_QUESTIONS_PER_VISIT + 6)]
    sub = collate(rows)
    assert sub["image"].shape == (3, 3, SIZE, SIZE) and sub["image_id"] == ["a", "b", "c"]
    Q = sum(len(row[QUESTIONS]) for row in rows)
    assert sub["question"].shape == (Q, 8) and sub["answer"].shape == sub["image_index"].shape == (Q,)
    assert sub["image_index"].dtype == torch.int64 and len(sub["qid"]) == len(sub["answer_raw"]) == Q
    for qid, image, raw in zip(sub["qid"], sub["image_index"].tolist(), sub["answer_raw"]):
        owner, number = qid.rsplit("_q", 1)
        assert owner == sub["image_id"][image] and raw == (number if int(number) % 2 else "yes")

    count_rows = TaskSamples("regression", vocabs, ImageTransform(SIZE, 3), 24, 8, train=False)
    sub = collate([count_rows(s, None) for s in samples[:2]])  # evaluation: every count question, once
    assert sub["count"].tolist() == [1, 3, 5, 7, 9, 1] and sub["image_index"].tolist() == [0] * 5 + [1]


def test_fan_out_visits_of_an_image_cover_its_questions(vocabs):
    make_row = TaskSamples("vqa", vocabs, ImageTransform(SIZE, 3, augment="symmetry"), 24, 8, train=True,
                           per_visit=4)
    rng = np.random.default_rng(1)
    sample = _many_questions("a", 12)
    visits = [_qids(make_row(sample, rng)) for _ in range(30)]  # a question is missed with p = (2/3) ** 30
    assert all(len(set(v)) == 4 for v in visits)
    assert {q for v in visits for q in v} == {f"a_q{k}" for k in range(12)}
    assert len({tuple(v) for v in visits}) > 1  # a random subset per visit, not the same one


def test_position_counts_rows_and_a_loader_started_there_continues_the_run(store, vocabs):
    cfg = make_cfg(store, ["toy"])
    loader = make_train_loader(cfg, vocabs, 0, 2)
    before = take(loader, 2)
    position = loader.position()
    assert position == {"seed": cfg.run.seed, "micro_batches": 2, "rows": dict.fromkeys(TASKS, 16)}  # 2 x 4 x 2 ranks
    after = take(make_train_loader(cfg, vocabs, 0, 2, start=position["micro_batches"]), 2)
    assert _fingerprint(before + after) == _fingerprint(take(make_train_loader(cfg, vocabs, 0, 2), 4))


def test_alternate_mode_picks_one_task_per_step_the_same_on_every_rank(store, vocabs):
    cfg = make_cfg(store, ["toy"], workers=2)
    cfg.train.mode = "alternate"
    per_rank = []
    for rank in range(2):
        per_rank.append([[t for t in b if t != IMAGES] for b in take(make_train_loader(cfg, vocabs, rank, 2), 6)])
    assert per_rank[0] == per_rank[1]
    assert all(len(tasks) == 1 for tasks in per_rank[0])
    assert [t[0] for t in per_rank[0]] == [alternate_task(cfg.run.seed, i, TASKS) for i in range(6)]
    assert len({t[0] for t in per_rank[0]}) > 1


def test_corpus_mixing_follows_the_weights(store):
    cfg = make_cfg(store, ["toy", "big"])  # 16 train images in 2 shards, 64 in 4
    vocabs = build_vocabs(cfg)

    def share_of_toy(rows: int = 4000) -> float:
        """Share of the rows that come from 'toy' (corpus 0), as the task's order decides it."""
        spec = task_stream_spec(cfg, vocabs, "classification", "train", ImageTransform(SIZE, 3), train=True)
        order = TaskOrder(3, "classification", [c.samples for c in spec.corpora], spec.weights)
        return sum(order.sample(g)[0] == 0 for g in range(rows)) / rows

    assert share_of_toy() == pytest.approx(16 / 80, abs=0.001)  # size
    cfg.data.corpus_mix = "temperature"
    cfg.data.mix_temperature = 2.0
    assert share_of_toy() == pytest.approx(4 / (4 + 8), abs=0.001)  # size ** (1 / T)
    cfg.tasks.classification.corpus_weights = {"toy": 3.0, "big": 1.0}
    assert share_of_toy() == pytest.approx(0.75, abs=0.001)  # explicit
    rows = _rows(cfg, vocabs, "classification", 960)  # and the rows are what the order says
    assert sum(r["image_id"].startswith("toy") for r in rows) / len(rows) == pytest.approx(0.75, abs=0.01)
    cfg.tasks.classification.corpus_weights = {"toy": 1.0}
    with pytest.raises(UserError, match="corpus_weights.big"):
        share_of_toy()


# ---- bad input ----


def _rewrite_tar(path: str, change) -> None:
    """Rewrite a shard member by member: change(name, data) -> new data."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            data = change(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def _damaged_store(root: str) -> tuple[str, str]:
    """'bad': 4 train shards of 6; shard 1 truncated, shard 2 with one corrupted PNG. -> (truncated, corrupted) URLs."""
    write_corpus(root, "bad", {"train": 24, "test": 12}, shard_size=6)
    urls = shard_urls(root, "bad", "train")
    with open(urls[1], "rb") as f:
        data = f.read()
    with open(urls[1], "wb") as f:
        f.write(data[: len(data) // 3])
    _rewrite_tar(urls[2], lambda name, data: b"not a png" if name == "bad_train_13.png" else data)
    return urls[1], urls[2]


def test_bad_shards_and_samples_are_skipped_counted_and_logged_once(tmp_path, caplog):
    truncated, corrupted = _damaged_store(str(tmp_path))
    counts = StreamCounts("vqa", 0.5)
    good = list(decode_samples(read_shards([{"url": u, "samples": 6} for u in (truncated, corrupted)], counts), counts))
    assert len(good) == counts.decoded and counts.decoded + counts.skipped == 12  # every sample accounted for
    assert 2 <= counts.skipped <= 7 and "bad_train_13" not in {s.image_id for s in good}

    cfg = make_cfg(tmp_path, ["bad"])
    cfg.data.max_bad_fraction = 0.9  # a quarter of the shards lose 2/3 of their samples: luck could pass 0.5
    cfg.tasks.vqa.batch_size = 8
    vocabs = build_vocabs(cfg)
    with caplog.at_level(logging.WARNING, logger="spatialnet_dist.data.streams"):
        loader = make_train_loader(cfg, vocabs, 0, 1)
        batches = take(loader, 30)
    skipped = loader.skipped
    for b in batches:
        assert all(len(b[t]["image_id"]) == getattr(cfg.tasks, t).batch_size for t in TASKS)
    assert all(skipped[t] > 0 for t in TASKS)
    seen = {i for b in batches for i in b["vqa"]["image_id"]}
    assert "bad_train_13" not in seen and "bad_train_0" in seen
    for url in (truncated, corrupted):  # named once, though all four task streams met it
        assert sum(url in r.getMessage() for r in caplog.records) == 1


def test_skipped_counts_reach_the_main_process_from_loader_workers(tmp_path):
    _damaged_store(str(tmp_path))
    cfg = make_cfg(tmp_path, ["bad"], workers=2)
    cfg.data.max_bad_fraction = 0.9
    loader = make_train_loader(cfg, build_vocabs(cfg), 0, 1)
    take(loader, 12)
    assert loader.skipped["vqa"] > 0 and loader.position()["rows"]["vqa"] == 48


def test_too_many_bad_samples_stop_the_run_naming_the_task(tmp_path):
    write_corpus(str(tmp_path), "junk", {"train": 8}, shard_size=4)
    for url in shard_urls(str(tmp_path), "junk", "train"):
        _rewrite_tar(url, lambda name, data: b"garbage" if name.endswith(".png") else data)
    cfg = make_cfg(tmp_path, ["junk"], workers=1)
    with pytest.raises(UserError, match="task captioning.*max_bad_fraction"):
        take(make_train_loader(cfg, build_vocabs(cfg), 0, 1), 1)


def test_a_corpus_with_nothing_for_a_task_stops_training_instead_of_spinning(tmp_path, monkeypatch):
    monkeypatch.setattr(train_rows, "USELESS_RUN_LIMIT", 50)
    with ShardWriter(str(tmp_path), "unlabelled", classes=CLASSES, shard_size=4) as w:
        for s in make_samples("unlabelled", "train", 8, classes=False):
            w.write(s)
    cfg = make_cfg(tmp_path, ["unlabelled"])
    with pytest.raises(UserError, match="task classification: 50 samples in a row"):
        take(make_train_loader(cfg, build_vocabs(cfg), 0, 1), 1)


def test_missing_shard_raises_store_error_naming_it(tmp_path):
    write_corpus(str(tmp_path), "gone", {"train": 8}, shard_size=4)
    missing = shard_urls(str(tmp_path), "gone", "train")[1]
    os.remove(missing)
    cfg = make_cfg(tmp_path, ["gone"], workers=1)
    with pytest.raises(StoreError, match=missing):
        take(make_train_loader(cfg, build_vocabs(cfg), 0, 1), 10)


def test_evaluation_is_strict_about_bad_shards(tmp_path):
    _damaged_store(str(tmp_path))
    cfg = make_cfg(tmp_path, ["bad"])
    url = shard_urls(str(tmp_path), "bad", "test")[0]
    _rewrite_tar(url, lambda name, data: b"not json" if name == "bad_test_2.json" else data)
    with pytest.raises(UserError, match=url):
        list(make_eval_loader(cfg, build_vocabs(cfg), "classification", "test", 0, 1))


# ---- evaluation loader ----


def test_evaluation_covers_every_sample_and_pair_once_across_ranks(store, vocabs):
    cfg = make_cfg(store, ["toy"], workers=2, batch_size=3)
    every_image = {f"toy_test_{i}" for i in range(20)}
    rows = {task: [] for task in TASKS}
    with deadline(60):
        for rank in range(2):
            for task in TASKS:
                for sub in make_eval_loader(cfg, vocabs, task, "test", rank, 2):
                    assert 0 < len(sub["image_id"]) <= 3 and sub["image"].shape[1:] == (3, SIZE, SIZE)
                    rows[task].append(sub)
    ids = {t: [i for sub in subs for i in sub["image_id"]] for t, subs in rows.items()}
    for task in ("captioning", "classification", "regression"):
        assert sorted(ids[task]) == sorted(every_image)  # once each
    qids = [q for sub in rows["vqa"] for q in sub["qid"]]
    assert sorted(qids) == sorted(f"{i}_q{k}" for i in every_image for k in range(2))
    refs = {i: r for sub in rows["captioning"] for i, r in zip(sub["image_id"], sub["references"])}
    assert refs["toy_test_4"] == ["a forest scene number 4", "many forest pixels"]
    first = rows["captioning"][0]
    assert first["tokens"][0].tolist() == vocabs.words.encode(first["references"][0][0], cfg.model.caption_max_len)


# ---- S3 ----


def test_s3_stream_gives_the_same_samples_as_local(store, vocabs, s3_bucket):
    root = f"s3://{s3_bucket}/store"
    write_corpus(root, "toy", {"train": 16, "test": 20}, shard_size=8)
    local, remote = make_cfg(store, ["toy"], workers=1), make_cfg(root, ["toy"], workers=1)
    assert build_vocabs(remote).to_dict() == vocabs.to_dict()
    assert _fingerprint(take(make_train_loader(remote, vocabs, 0, 1), 3)) == _fingerprint(
        take(make_train_loader(local, vocabs, 0, 1), 3)
    )
    subs = {name: list(make_eval_loader(c, vocabs, "vqa", "test", 0, 1)) for name, c in (("l", local), ("r", remote))}
    assert [s["qid"] for s in subs["l"]] == [s["qid"] for s in subs["r"]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(subs["l"], subs["r"]))
    missing = f"{root}/toy/train/toy-train-000009.tar"
    with pytest.raises(StoreError, match=missing):
        list(read_shards([{"url": missing, "samples": 1}], StreamCounts("vqa", 0.5)))
