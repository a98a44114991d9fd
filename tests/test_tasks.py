"""The task registry: a task defined here is registered at runtime and trains, validates, evaluates and
reports with no other change; multi-label tagging's metrics against hand-computed values; a former task
name in a config is an error naming the new one; every registered task reaches config, model,
objective, evaluation and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import as_torchrun_worker, spawn_ranks
from torch import nn

from spatialnet_dist import config as config_mod
from spatialnet_dist import tasks as registry
from spatialnet_dist.config import ConfigError
from spatialnet_dist.model.spatialnet import assemble_model
from spatialnet_dist.networks.heads import VocabSizes
from spatialnet_dist.store.schema import Sample
from spatialnet_dist.store.writer import ShardWriter
from spatialnet_dist.tasks.base import Task
from spatialnet_dist.tasks.tagging import average_precision, score_tagging

# ---- a task of this test's own: how bright an image is ----


class BrightnessHead(nn.Module):
    def __init__(self, encoder_dim: int):
        super().__init__()
        self.fc = nn.Linear(encoder_dim, 1)

    def forward(self, tokens, pooled, sub_batch) -> dict:
        return {"brightness": self.fc(pooled).squeeze(-1)}  # (B,)


class Brightness(Task):
    """The mean pixel value of the image, in [0, 1]: any corpus has it."""

    name = "brightness"
    needs = "images"
    default_enabled = False
    validation_keys = ("MAE",)
    headline_keys = ("MAE",)
    report_heading = "Brightness (a test's task)"

    def has_content(self, manifest, split):
        return split.get("samples", 0) > 0

    def row(self, sample, rows, rng, symmetry):
        return {"brightness": float(sample.image.mean() / 255)}

    def head(self, encoder_dim, preset, sizes, model_cfg, task_cfg):
        return BrightnessHead(encoder_dim)

    def loss(self, out, sub, cfg, state):
        return F.mse_loss(out["brightness"].float(), sub["brightness"].float())

    def predict(self, model, sub, images, cfg, vocabs):
        pred = model({self.name: {"image": images}})[self.name]["brightness"].float().tolist()
        return [{"image_id": i, "brightness": float(t), "prediction": p}
                for i, t, p in zip(sub["image_id"], sub["brightness"], pred)]

    def score(self, rows, cfg, vocabs):
        return {"MAE": float(np.mean([abs(r["prediction"] - r["brightness"]) for r in rows])), "n": len(rows)}

    def baselines(self, rows, cfg, vocabs):
        mean = float(np.mean([r["brightness"] for r in rows]))
        return {"mean": {"MAE": float(np.mean([abs(mean - r["brightness"]) for r in rows])), "name": "split mean"}}

    def report_section(self, scores, out_dir):
        return [f"MAE {scores['MAE']:.4f} over {scores['n']} images", ""]


BRIGHTNESS = Brightness()


@pytest.fixture
def brightness():
    registry.register(BRIGHTNESS)
    yield BRIGHTNESS
    registry.unregister(BRIGHTNESS.name)


# ---- a small corpus with tags ----

TAGS = ["building", "road", "tree", "water"]


def write_tagged(root: str) -> None:
    """24 images (16 train, 4 val, 4 test) whose tags follow their colour: tree on green ones, water on
    blue ones, building and road alternating; every image has at least one tag."""
    rng = np.random.default_rng(0)
    with ShardWriter(root, "tagged", classes=["a", "b"], shard_size=4, min_shards=1) as w:
        for i in range(24):
            split = "train" if i < 16 else "val" if i < 20 else "test"
            tags = [t for t, on in zip(TAGS, (i % 2 == 0, i % 3 == 0, i % 4 < 2, i % 4 >= 2)) if on]
            image = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            image[..., 1] += 120 * ("tree" in tags)
            image[..., 2] += 120 * ("water" in tags)
            w.write(Sample(corpus="tagged", image_id=f"im{i:02d}", split=split, image=image, label=i % 2,
                           label_name="ab"[i % 2], tags=tags))


def _toy_worker(rank: int, port: int, root: str, run_dir: str, out: str):
    """One rank, no Ray: register the test's task, train brightness and tagging two steps (validating at
    the second), then evaluate and report on the test split."""
    as_torchrun_worker(0, 1, port)
    from spatialnet_dist import engine as ds
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.evaluate.run import ValidationPass, evaluate_model
    from spatialnet_dist.train.local import train

    torch.set_num_threads(1)
    registry.register(BRIGHTNESS)
    off = [f"tasks.{t}.enabled=false" for t in registry.DEFAULT_TASKS]
    cfg = config_mod.load(None, [*off, "model.image_size=32", f"data.root={root}", f"run.storage={run_dir}",
                                 "data.loader_workers=0", "train.zero_stage=0", "train.max_steps=2",
                                 "train.checkpoint_every=2", "train.log_every=1", "eval.every=2", "eval.val_batches=1",
                                 "optim.warmup_steps=0", "tasks.brightness.enabled=true",
                                 "tasks.brightness.corpora=[tagged]", "tasks.brightness.batch_size=4",
                                 "tasks.tagging.enabled=true", "tasks.tagging.corpora=[tagged]",
                                 "tasks.tagging.batch_size=4", "tasks.tagging.pos_weight=true"])
    ds.init_distributed(False)
    vocabs = build_vocabs(cfg)
    trained = train(cfg, vocabs, run_dir, rank, 1, ValidationPass)
    metrics = evaluate_model(trained.inference_model(), cfg, vocabs, "test", rank, 1, out_dir=f"{out}/eval",
                             metrics_jsonl=f"{run_dir}/metrics.jsonl")
    Path(out, "result.json").write_text(json.dumps({"tags": vocabs.tags, "metrics": metrics}))


@pytest.mark.slow  # a spawned DeepSpeed rank trains, validates and evaluates: minutes on 2 loaded cores
def test_a_task_defined_in_a_test_trains_validates_evaluates_and_reports(tmp_path, free_ports):

    root, run_dir = str(tmp_path / "shards"), str(tmp_path / "run")
    write_tagged(root)
    spawn_ranks(_toy_worker, args=(free_ports(1)[0], root, run_dir, str(tmp_path)), nprocs=1)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["tags"] == TAGS  # the manifest's tag set, sorted
    metrics = result["metrics"]
    assert set(metrics) == {"brightness", "tagging"}
    assert metrics["brightness"]["n"] == 4 and metrics["brightness"]["baselines"]["mean"]["name"] == "split mean"
    tagging = metrics["tagging"]
    assert set(tagging["per_tag_AP"]) == set(TAGS) and tagging["n"] == 4
    assert 0 <= tagging["mAP_macro"] <= 1 and 0 <= tagging["F1"] <= 1
    assert tagging["baselines"]["frequency"]["name"] == "training tag frequencies (16 images)"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("brightness_loss" in line and "tagging_loss" in line for line in lines if "loss" in line)
    validated = [line for line in lines if "val/brightness_loss" in line]
    assert validated and "val/brightness_MAE" in validated[0] and "val/tagging_mAP_macro" in validated[0]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "### Brightness (a test's task)" in report and "### Multi-label tagging" in report
    predictions = json.loads((tmp_path / "eval" / "predictions" / "tagging.json").read_text())
    assert len(predictions) == 4 and set(predictions[0]["scores"]) == set(TAGS)
    assert (tmp_path / "eval" / "predictions" / "brightness.json").is_file()


# ---- tagging's metrics ----


def test_average_precision_by_hand():
    # ranking 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): precision at the positives 1 and 2/3 -> (1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0], bool)) == pytest.approx(5 / 6)
    # tied scores are one threshold: all four at once, precision 2/4, recall 1
    assert average_precision(np.full(4, 0.3), np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)
    assert average_precision(np.array([0.2, 0.1]), np.zeros(2, bool)) is None


def test_tagging_scores_by_hand():
    tags = ["a", "b", "c"]
    truth = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]], bool)  # c never appears
    scores = np.array([[0.9, 0.2, 0.1], [0.4, 0.6, 0.3], [0.7, 0.8, 0.0]])
    s = score_tagging(scores, truth, tags)
    # a: ranking 0.9 (pos), 0.7 (neg), 0.4 (pos) -> (1 + 2/3) / 2; b: 0.8 (pos), 0.6 (pos), 0.2 -> 1; c: no positive
    assert s["per_tag_AP"] == {"a": pytest.approx(5 / 6), "b": pytest.approx(1.0), "c": None}
    assert s["mAP_macro"] == pytest.approx((5 / 6 + 1) / 2)
    # micro: 9 pairs ranked 0.9+ 0.8+ 0.7- 0.6+ 0.4+ 0.3- 0.2- 0.1- 0.0-: precisions 1, 1, 3/4, 4/5 at the positives
    assert s["mAP_micro"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 5) / 4)
    # at 0.5: predicted (0,a) (1,b) (2,a) (2,b): tp 3 of 4 predicted, 4 true -> F1 = 2*3 / (4 + 4)
    assert s["F1"] == pytest.approx(6 / 8)
    # per tag with a positive: a tp 1, 2 predicted, 2 true -> 1/2; b tp 2, 2, 2 -> 1
    assert s["F1_macro"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["n"] == 3


def test_tagging_rows_vocabulary_and_positive_weights(tmp_path):
    from spatialnet_dist.data.streams import TaskSamples
    from spatialnet_dist.data.transforms import task_transform
    from spatialnet_dist.data.vocab import build_vocabs

    root = str(tmp_path / "shards")
    write_tagged(root)
    cfg = config_mod.load(None, [f"data.root={root}", "tasks.tagging.enabled=true", "tasks.tagging.corpora=[tagged]",
                                 "tasks.tagging.pos_weight=true", "tasks.classification.corpora=[tagged]",
                                 *[f"tasks.{t}.enabled=false" for t in ("captioning", "vqa", "regression")]])
    vocabs = build_vocabs(cfg)
    assert vocabs.tags == TAGS
    rows = TaskSamples("tagging", vocabs, task_transform(cfg, "tagging", train=False), 8, 8, train=False)
    image = np.zeros((32, 32, 3), np.uint8)
    row = rows(Sample("tagged", "x", "test", image, tags=["water", "building", "unknown"]), None)
    assert row["tags"].tolist() == [1.0, 0.0, 0.0, 1.0]  # a name outside the run's tag set is not a label
    assert rows(Sample("tagged", "y", "test", image), None) is None  # tags unknown: no row
    # train images 0..15: building on 8 (even), water on 8 (i % 4 >= 2) -> neg/pos 1; road on 6 (i % 3 == 0) -> 10/6
    weights = registry.get("tagging").loss_state(cfg, vocabs)
    assert weights.tolist() == pytest.approx([1.0, 10 / 6, 1.0, 1.0])


def test_an_old_vocab_file_reads_as_no_tags():
    from spatialnet_dist.text import SPECIALS, TextVocabs

    old = {"words": list(SPECIALS), "answers": ["yes"], "answer_rule": "exact", "classes": ["a"]}
    assert TextVocabs.from_dict(old).tags == []


# ---- names and coverage ----


@pytest.mark.parametrize("override, message", [
    ("tasks.captions.batch_size=2", "config key tasks.captions: the task is now named 'captioning'; use tasks.captioning"),
    ("loss.weights.count=2", "config key loss.weights.count: the task is now named 'regression'; use loss.weights.regression"),
])
def test_a_former_task_name_is_an_error_naming_the_new_one(override, message):
    with pytest.raises(ConfigError) as e:
        config_mod.load(None, [override])
    assert str(e.value) == message


def test_every_registered_task_reaches_config_model_objective_evaluation_and_report(brightness, tmp_path):
    from spatialnet_dist.objective import MultiTaskObjective

    cfg = config_mod.Config()
    names = registry.names()
    assert names[-1] == "brightness" and set(registry.DEFAULT_TASKS) < set(names)
    for name in names:
        assert getattr(cfg.tasks, name).enabled == registry.get(name).default_enabled
        assert cfg.loss.weights[name] == 1.0
        with pytest.raises(ConfigError, match=rf"tasks\.{name}\.batch_size"):
            config_mod.load(None, [f"tasks.{name}.batch_size=0"])
    model = assemble_model(config_mod.ModelConfig(image_size=32), names,
                           VocabSizes(words=12, answers=3, classes=2, tags=4))
    assert set(model.heads) == set(names)
    # the objective and evaluation ask the registry: a batch of the test's task alone goes through both
    sub = {"image": torch.rand(2, 3, 32, 32), "image_id": ["a", "b"], "brightness": torch.tensor([0.2, 0.4])}
    losses = MultiTaskObjective(cfg.loss)(model({"brightness": sub}), {"brightness": sub})
    assert set(losses) == {"loss", "brightness_loss"}
    rows = brightness.predict(model, sub, sub["image"], cfg, None)
    from spatialnet_dist.evaluate.report import write_report
    from spatialnet_dist.evaluate.run import score_predictions

    metrics = score_predictions({"brightness": rows}, cfg, None)
    assert metrics["brightness"]["n"] == 2
    report = write_report(tmp_path, metrics)
    assert "### Brightness (a test's task)" in report.read_text()


# ---- test-time augmentation (eval.tta) ----


def _probabilities(task: str, rows: list[dict]) -> torch.Tensor:
    """What a prediction row says: classification's class and its probability, tagging's tag probabilities."""
    if task == "classification":
        return torch.tensor([[r["prediction"], r["probability"]] for r in rows])
    return torch.tensor([r["scores"] for r in rows])


@pytest.mark.parametrize("task", ["classification", "tagging"])
def test_symmetry_tta_predicts_a_turned_image_as_the_image_and_none_is_the_plain_prediction(task):
    cfg = config_mod.load(None, ["model.image_size=32"])
    model = assemble_model(cfg.model, [task], VocabSizes(words=12, answers=3, classes=5, tags=4)).eval()
    images = torch.rand(3, 3, 32, 32)  # (B, C, S, S)
    sub = {"image_id": ["a", "b", "c"], "label": torch.tensor([0, 1, 2]), "tags": torch.zeros(3, 4)}

    def predicted(images: torch.Tensor, tta: str) -> torch.Tensor:
        cfg.eval.tta = tta
        with torch.no_grad():
            return _probabilities(task, registry.get(task).predict(model, sub, images, cfg, None))

    turned = torch.rot90(images, 1, dims=(2, 3))  # a quarter turn of every image
    torch.testing.assert_close(predicted(turned, "symmetry"), predicted(images, "symmetry"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(predicted(images.flip(3), "symmetry"), predicted(images, "symmetry"), rtol=1e-5,
                               atol=1e-6)
    with torch.no_grad():
        logits = model({task: {"image": images}})[task]["logits"].float()  # (B, K)
    if task == "classification":
        best_p, best = logits.softmax(-1).max(-1)
        plain = torch.stack([best.float(), best_p], 1)
    else:
        plain = logits.sigmoid()
    assert torch.equal(predicted(images, "none"), plain)
    # the untrained model itself tells a turned image apart: the equality above is the averaging's
    assert not torch.allclose(predicted(turned, "none"), predicted(images, "none"), rtol=1e-3, atol=1e-4)


def test_a_symmetry_moves_a_batch_as_it_moves_each_image():
    from spatialnet_dist.symmetry import SYMMETRIES

    images = torch.rand(2, 3, 8, 8)  # (B, C, H, W)
    for symmetry in SYMMETRIES:
        assert torch.equal(symmetry.apply(images), torch.stack([symmetry.apply(image) for image in images]))
