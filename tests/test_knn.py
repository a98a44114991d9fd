"""eval.knn: the weighted k-nearest-neighbour accuracy of the frozen encoder on a labelled corpus (evaluate/knn.py),
logged at every validation as val/knn_accuracy: the vote on hand-made vectors, the corpus's images as every rank
reads its share, a run in this process against an independent vote, two ranks against one, and the config's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import as_torchrun_worker, spawn_ranks
from test_trainer import RecordingReporter, world_of_one  # noqa: F401  (world_of_one: a fixture)

from spatialnet_dist import config as config_mod
from spatialnet_dist import tasks as registry
from spatialnet_dist.errors import ConfigError, UserError
from spatialnet_dist.evaluate.knn import TEMPERATURE, weighted_knn

CLASSES = ["red", "green", "blue"]
CORPUS = "colours"
TRAIN, VAL = 30, 12


def _colour_samples(seed: int = 0) -> list:
    """32 px RGB images, each of a class whose band stands out by a random strength (the weak ones look alike),
    TRAIN in train, VAL in val, one more train image without a class."""
    from spatialnet_dist.store.schema import Sample

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(TRAIN + VAL + 1):
        label = i % len(CLASSES)
        image = rng.integers(0, 120, (32, 32, 3)).astype(np.float32)
        image[:, :, label] += rng.uniform(0, 30)
        samples.append(Sample(corpus=CORPUS, image_id=f"c{i:03d}", split="train" if i < TRAIN or i == TRAIN + VAL
                              else "val", image=image.astype(np.uint8),
                              label=None if i == TRAIN + VAL else label,
                              label_name=None if i == TRAIN + VAL else CLASSES[label]))
    return samples


def _write_colours(root: str) -> list:
    from spatialnet_dist.store.writer import ShardWriter

    samples = _colour_samples()
    with ShardWriter(root, CORPUS, source="test_knn", classes=CLASSES, shard_size=4) as writer:
        for sample in samples:
            writer.write(sample)
    return samples


@pytest.fixture(scope="module")
def colours_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("knn") / "shards")
    _write_colours(root)
    return root


# ---- the vote ----


def _around_first_axis(similarities: list[float], dim: int = 8) -> torch.Tensor:
    """Unit vectors (n, dim) with the given cosine similarities to e_0, each tilted along its own axis."""
    out = torch.zeros(len(similarities), dim)
    for i, s in enumerate(similarities):
        out[i, 0], out[i, i + 1] = s, (1 - s * s) ** 0.5
    return out


def test_two_clusters_vote_their_class_whatever_the_vectors_lengths():
    rng = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0] * 10 + [1] * 10)
    bank = centres[labels] + 0.1 * torch.randn(20, 3, generator=rng)
    queries = centres[torch.tensor([0, 1, 1, 0])] + 0.1 * torch.randn(4, 3, generator=rng)
    assert weighted_knn(bank, labels, queries, k=5).tolist() == [0, 1, 1, 0]
    scales = torch.rand(20, 1, generator=rng) * 100  # cosine similarity: the L2 norms do not count
    assert weighted_knn(bank * scales, labels, queries * 3, k=5).tolist() == [0, 1, 1, 0]


def test_one_near_neighbour_outvotes_three_farther_ones_at_dinos_temperature_but_not_at_one():
    """A query at e_0: one class-0 vector at similarity 0.99, three class-1 vectors at 0.85. With T = 0.07 the near
    one weighs exp(0.99 / 0.07) ~ 1.4e6 against 3 exp(0.85 / 0.07) ~ 5.6e5; with T = 1, 2.7 against 7.0."""
    bank, labels, query = _around_first_axis([0.99, 0.85, 0.85, 0.85]), torch.tensor([0, 1, 1, 1]), torch.eye(8)[:1]
    assert TEMPERATURE == 0.07
    assert weighted_knn(bank, labels, query, k=4).tolist() == [0]
    assert weighted_knn(bank, labels, query, k=4, temperature=1.0).tolist() == [1]
    assert weighted_knn(bank, labels, query, k=1, temperature=1.0).tolist() == [0]  # the nearest alone votes
    # k beyond the bank: every vector votes, as k = 4
    assert weighted_knn(bank, labels, query, k=100, temperature=1.0).tolist() == [1]
    # only the k nearest vote: three class-1 vectors farther than two class-0 ones
    bank, labels = _around_first_axis([0.5, 0.5, 0.5, 0.9, 0.8]), torch.tensor([1, 1, 1, 0, 0])
    assert weighted_knn(bank, labels, query, k=2, temperature=1.0).tolist() == [0]
    assert weighted_knn(bank, labels, query, k=5, temperature=1.0).tolist() == [1]


def test_a_tie_goes_to_the_lowest_class_id():
    bank = _around_first_axis([0.7, 0.7])
    query = torch.eye(8)[:1]
    assert weighted_knn(bank, torch.tensor([2, 1]), query, k=2).tolist() == [1]
    assert weighted_knn(bank, torch.tensor([1, 2]), query, k=2).tolist() == [1]


# ---- the corpus's images ----


def test_shard_quotas_take_each_shards_share_and_sum_to_the_limit():
    from spatialnet_dist.data.batches import shard_quotas

    assert shard_quotas([10, 10, 5], 12) == [5, 5, 2]
    assert shard_quotas([10, 10, 5], 0) == shard_quotas([10, 10, 5], 25) == shard_quotas([10, 10, 5], 99) == [10, 10, 5]
    for sizes in ([3, 3, 3, 3, 2], [0, 4, 1], [7]):
        for limit in range(1, sum(sizes) + 1):
            quotas = shard_quotas(sizes, limit)
            assert sum(quotas) == limit and all(0 <= q <= s for q, s in zip(quotas, sizes)), (sizes, limit)


def test_every_rank_reads_its_share_of_the_labelled_images_and_the_limit_picks_the_same_ones(colours_root):
    from spatialnet_dist.data.batches import make_labelled_loader
    from spatialnet_dist.store.manifest import read_manifest

    cfg = config_mod.load(None, [f"data.root={colours_root}", "model.image_size=32", "data.loader_workers=0"])
    by_id = {s.image_id: s for s in _colour_samples()}

    def read(split: str, world_size: int, limit: int) -> list[dict]:
        return [{"id": i, "label": int(label), "image": image} for rank in range(world_size)
                for sub in make_labelled_loader(cfg, CORPUS, split, rank, world_size, limit, batch_size=4)
                for i, label, image in zip(sub["image_id"], sub["label"], sub["image"])]

    whole = read("train", 1, 0)
    assert sorted(r["id"] for r in whole) == sorted(i for i, s in by_id.items() if s.split == "train" and s.label_name)
    assert all(r["label"] == CLASSES.index(by_id[r["id"]].label_name) for r in whole)  # the manifest's class ids
    assert whole[0]["image"].shape == (3, 32, 32)
    two = read("train", 2, 0)
    assert sorted(r["id"] for r in two) == sorted(r["id"] for r in whole)  # each image once over the ranks
    shards = len(read_manifest(colours_root, CORPUS)["splits"]["train"]["shards"])
    capped = {r["id"] for r in read("train", 1, 10)}
    assert len(capped) <= 10 and capped == {r["id"] for r in read("train", 2, 10)}  # whatever the world size
    assert len(capped) >= 10 - 1  # at most the image without a class is left out
    assert shards > 1 and len(read("val", 1, 0)) == VAL


# ---- in a run ----


def _numpy_knn_accuracy(model, samples: list, k: int) -> float:
    """The accuracy as DINO computes it, from the model's pooled vectors of the samples, written out apart."""
    from spatialnet_dist.data.transforms import ImageTransform

    transform = ImageTransform(32, 3)

    def vectors(split: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = [s for s in samples if s.split == split and s.label_name]
        with torch.no_grad():
            _, pooled = model.encode(torch.stack([transform(s.image) for s in chosen]))
        pooled = pooled.numpy()
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True), np.array([s.label for s in chosen])

    (bank, bank_labels), (queries, labels) = vectors("train"), vectors("val")
    right = 0
    for query, label in zip(queries, labels):
        similarity = bank @ query
        nearest = np.argsort(-similarity)[:k]
        votes = np.zeros(len(CLASSES))
        np.add.at(votes, bank_labels[nearest], np.exp(similarity[nearest] / 0.07))
        right += int(np.argmax(votes) == label)
    return right / len(labels)


def test_validation_logs_the_knn_accuracy_of_the_encoder_on_a_corpus_no_task_reads(world_of_one, tmp_path):  # noqa: F811
    """Captioning alone trains on the synthetic corpus; eval.knn scores the encoder on the colour corpus at each
    validation: val/knn_accuracy, the value of an independent vote over the model's pooled vectors."""
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.evaluate.run import ValidationPass
    from spatialnet_dist.train.trainer import Trainer

    samples = _write_colours(world_of_one)
    cfg = config_mod.load(None, [
        f"data.root={world_of_one}", "model.image_size=32", "data.loader_workers=0", "train.cpus_per_worker=1",
        *(f"tasks.{t}.enabled={t == 'captioning'}" for t in registry.names()), "tasks.captioning.batch_size=2",
        "train.max_steps=2", "train.checkpoint_every=2", "eval.every=1", "eval.val_batches=1", "eval.at_end=false",
        "eval.beam_size=1", f"eval.knn.corpus={CORPUS}", "eval.knn.k=5"])
    reporter = RecordingReporter(tmp_path)
    trainer = Trainer.build(cfg, build_vocabs(cfg), 0, 1, reporter, ValidationPass)
    reporter.trainer = trainer
    trainer.fit()
    validated = [m for m in reporter.metrics if "val/captioning_loss" in m]
    assert [m["step"] for m in validated] == [1, 2] and all("val/knn_accuracy" in m for m in validated)
    model = trainer.inference_model().eval()
    expected = _numpy_knn_accuracy(model, samples, k=5)
    assert validated[-1]["val/knn_accuracy"] == pytest.approx(expected)
    print(f"kNN accuracy at step 2: {expected:.3f}")


def _two_rank_worker(rank: int, world_size: int, port: int, root: str, out: str):
    as_torchrun_worker(rank, world_size, port)
    import torch.distributed as dist

    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.evaluate.knn import knn_accuracy
    from spatialnet_dist.model.spatialnet import build_model

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = config_mod.load(None, [f"data.root={root}", "model.image_size=32", "data.loader_workers=0",
                                 *(f"tasks.{t}.enabled={t == 'classification'}" for t in registry.names()),
                                 f"tasks.classification.corpora=[{CORPUS}]", f"eval.knn.corpus={CORPUS}",
                                 "eval.knn.k=5", "eval.knn.max_train=20"])
    torch.manual_seed(0)
    model = build_model(cfg.model, ["classification"], build_vocabs(cfg)).eval()
    accuracy = knn_accuracy(model, cfg, rank, world_size)
    alone = knn_accuracy(model, cfg, 0, 1) if rank == 0 else None
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"accuracy": accuracy, "alone": alone}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_gather_their_shares_to_the_one_rank_accuracy(colours_root, tmp_path, free_ports):
    """Two ranks under gloo each embed their share of the bank (eval.knn.max_train of it) and of the val split; rank 0
    gathers and votes the accuracy one rank gets alone, rank 1 gets None."""

    spawn_ranks(_two_rank_worker, args=(2, free_ports(1)[0], colours_root, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["accuracy"] == pytest.approx(ranks[0]["alone"]) and ranks[1]["accuracy"] is None


# ---- the config ----


def test_the_knn_keys_are_checked_and_keep_best_takes_the_accuracy_when_it_is_on():
    every = ["eval.every=2", "train.checkpoint_every=2"]
    assert config_mod.load(None, [*every, "eval.knn.corpus=ucm", "eval.keep_best=knn_accuracy"]).eval.knn.corpus == "ucm"
    for overrides, message in (
        (["eval.knn.k=0"], "config key eval.knn.k: 0 is not allowed (expected >= 1)"),
        (["eval.knn.max_train=-1"], "config key eval.knn.max_train: -1 is not allowed (expected >= 1)"),
        (["eval.knn.kk=3"], "unknown config key eval.knn.kk (did you mean eval.knn.k?)"),
        ([*every, "eval.keep_best=knn_accuracy"], "config key eval.keep_best: 'knn_accuracy' is not a validation"),
    ):
        with pytest.raises(ConfigError) as raised:
            config_mod.load(None, overrides)
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value), overrides


def test_preflight_names_a_knn_corpus_that_is_missing_or_has_no_classes(colours_root, tmp_path):
    from spatialnet_dist.corpora.synthetic import write_synthetic
    from spatialnet_dist.train import preflight

    def refusal(root: str, corpus: str) -> str:
        with pytest.raises(UserError) as raised:
            preflight.check_knn_corpus(config_mod.load(None, [f"data.root={root}", "eval.every=5",
                                                              f"eval.knn.corpus={corpus}"]))
        assert "\n" not in str(raised.value)
        return str(raised.value)

    preflight.check_knn_corpus(config_mod.load(None, [f"data.root={colours_root}", "eval.every=5",
                                                      f"eval.knn.corpus={CORPUS}"]))
    preflight.check_knn_corpus(config_mod.load(None, [f"data.root={colours_root}", "eval.every=0",
                                                      "eval.knn.corpus=nowhere"]))  # no validation: not read
    assert refusal(colours_root, "ucm").startswith("eval.knn.corpus: corpus ucm: no ") and "convert" in refusal(
        colours_root, "ucm")
    manifest = Path(colours_root, CORPUS, "manifest.json")
    unlabelled = tmp_path / "unlabelled"
    write_synthetic(str(unlabelled), images=20, seed=0)
    data = json.loads(Path(unlabelled, "synthetic", "manifest.json").read_text())
    data["classes"] = []
    Path(unlabelled, "synthetic", "manifest.json").write_text(json.dumps(data))
    assert refusal(str(unlabelled), "synthetic") == (f"eval.knn.corpus: corpus synthetic under {unlabelled} has no "
                                                     "classes; the kNN accuracy needs a labelled corpus (image classes "
                                                     "in its manifest)")
    shard = json.loads(manifest.read_text())["splits"]["val"]["shards"][0]["name"]
    Path(colours_root, CORPUS, "val", shard).rename(tmp_path / shard)
    try:
        assert refusal(colours_root, CORPUS).endswith(f"{shard}: listed in {manifest} but missing")
    finally:
        (tmp_path / shard).rename(Path(colours_root, CORPUS, "val", shard))
