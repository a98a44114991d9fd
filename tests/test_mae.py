"""mae, masked autoencoding (tasks/mae.py): the encoder sees only the kept patches and the loss only the masked
ones, against hand computations; norm_pix targets by hand for 13 bands; it learns a fixed batch; through the
Trainer alone on an unlabeled 13-band uint16 corpus (a resume is bit for bit the uninterrupted run, its masks
included; through Ray Train with a worker SIGKILLed mid-way: test_train's ZeRO-3 kill test); a 13-band classifier
fine-tuned from that pretraining; beside classification under ZeRO-3 with validation; evaluation rows, scores, files and
report; its config keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spatialnet_dist import config as config_mod
from spatialnet_dist import tasks as registry
from spatialnet_dist.batch_format import MASK_NOISE
from spatialnet_dist.config import ConfigError
from spatialnet_dist.model.spatialnet import assemble_model
from spatialnet_dist.networks.heads import VocabSizes
from spatialnet_dist.store.schema import Sample
from spatialnet_dist.store.writer import ShardWriter
from spatialnet_dist.tasks.mae import patchify, reconstruction_targets, unpatchify, visible_count
from tests.test_trainer import RecordingReporter, _trainer, world_of_one  # noqa: F401  (world_of_one: a fixture)

MAE = registry.get("mae")
PATCH, PATCHES, KEPT = 8, 16, 4  # 32 px images in 8 px patches: a 4 x 4 grid, 0.75 masked leaves 4
BANDS = 13
SPLITS = {"train": 12, "val": 4, "test": 12}  # test: more images than the report shows (evaluate.run.REPORT_IMAGES)
OTHER_TASKS = [f"tasks.{t}.enabled=false" for t in registry.names() if t != "mae"]


def _config(*overrides: str):
    return config_mod.load(None, ["model.image_size=32", f"model.patch_size={PATCH}", "tasks.mae.enabled=true",
                                  *overrides])


def _model(cfg, tasks=("mae",)):
    torch.manual_seed(0)
    return assemble_model(cfg.model, list(tasks), VocabSizes(words=8, answers=2, classes=5), task_cfgs=cfg.tasks)


def write_unlabeled(root: str) -> None:
    """An image-only corpus: 13-band uint16 rasters, no label, caption, question or tag."""
    rng = np.random.default_rng(0)
    with ShardWriter(root, "unlabeled", shard_size=4, min_shards=1) as w:
        for split, n in SPLITS.items():
            for i in range(n):
                image = rng.integers(0, 3000, (32, 32, BANDS), dtype=np.uint16)
                w.write(Sample(corpus="unlabeled", image_id=f"{split}{i:02d}", split=split, image=image))


def write_labelled(root: str) -> None:
    """A labelled corpus of the same 13-band uint16 kind: two land-use classes."""
    rng = np.random.default_rng(1)
    with ShardWriter(root, "labelled", classes=["farm", "forest"], shard_size=4, min_shards=1) as w:
        for split, n in SPLITS.items():
            for i in range(n):
                image = rng.integers(0, 3000, (32, 32, BANDS), dtype=np.uint16)
                w.write(Sample(corpus="labelled", image_id=f"{split}{i:02d}", split=split, image=image, label=i % 2,
                               label_name=("farm", "forest")[i % 2]))


@pytest.fixture(scope="module")
def store(world_of_one):  # noqa: F811
    """world_of_one's synthetic corpus and the unlabeled one, in one store."""
    write_unlabeled(world_of_one)
    return world_of_one


def _unlabeled_config(root: str, *overrides: str):
    return _config(f"data.root={root}", f"model.in_chans={BANDS}", "data.loader_workers=0", "train.cpus_per_worker=1",
                   *OTHER_TASKS, "tasks.mae.corpora=[unlabeled]", "tasks.mae.batch_size=2", *overrides)


# ---- masking and loss ----


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_the_encoder_sees_only_the_kept_patches_and_the_loss_reads_only_the_masked_ones(stem):
    assert [visible_count(16, 0.75), visible_count(64, 0.75), visible_count(4, 0.99), visible_count(4, 0.01)] == [4, 16, 1, 3]
    cfg = _config(f"model.stem={stem}")
    model = _model(cfg).eval()
    assert model.heads["mae"].visible_tokens == KEPT
    torch.manual_seed(1)
    images, noise = torch.rand(2, 3, 32, 32), torch.rand(2, PATCHES)  # (B, C, S, S), (B, N)
    tokens, pooled, kept = model.encoder.encode_visible(images, KEPT, noise)
    assert tokens.shape == (2, KEPT, model.encoder.embed_dim) and torch.equal(kept, noise.argsort(1)[:, :KEPT])
    _, _, drawn = model.encoder.encode_visible(images, KEPT)  # no noise: torch's RNG, a new draw per image
    assert not torch.equal(drawn[0].sort().values, drawn[1].sort().values)

    def with_patch_changed(patch: int) -> torch.Tensor:
        changed = images.clone()
        row, col = divmod(patch, 4)
        changed[0, :, PATCH * row: PATCH * (row + 1), PATCH * col: PATCH * (col + 1)] = 5.0
        return changed

    def beside_a_kept_one(patch: int) -> bool:  # within a conv stem's receptive field of a kept patch
        return any(abs(patch // 4 - k // 4) + abs(patch % 4 - k % 4) == 1 for k in kept[0].tolist())

    hidden = next(p for p in range(PATCHES) if p not in kept[0].tolist() and beside_a_kept_one(p))
    unseen = model.encoder.encode_visible(with_patch_changed(hidden), KEPT, noise)
    assert torch.equal(unseen[0], tokens) and torch.equal(unseen[1], pooled)  # a masked patch reaches no token
    seen = model.encoder.encode_visible(with_patch_changed(int(kept[0, 0])), KEPT, noise)
    assert not torch.equal(seen[0][0], tokens[0])

    sub = {"image": images, "image_id": ["a", "b"], MASK_NOISE: noise}
    out = model({"mae": sub})["mae"]
    assert out["pred"].shape == (2, PATCHES, PATCH * PATCH * 3)
    assert out["mask"].sum(1).tolist() == [PATCHES - KEPT] * 2 and not out["mask"].gather(1, kept).any()
    state = MAE.loss_state(cfg, None)
    loss = MAE.loss(out, sub, cfg.loss, state)
    target = reconstruction_targets(images, PATCH, norm_pix=True)
    by_hand = np.mean([((out["pred"][b, p] - target[b, p]) ** 2).mean().item()
                       for b in range(2) for p in range(PATCHES) if p not in kept[b].tolist()])
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    wrong_where_seen = out["pred"].clone()
    wrong_where_seen[0, kept[0]] += 100.0  # image 0's predictions of the patches its encoder saw
    assert torch.equal(MAE.loss({**out, "pred": wrong_where_seen}, sub, cfg.loss, state), loss)
    wrong_where_hidden = out["pred"].clone()
    wrong_where_hidden[0, hidden] += 100.0
    assert MAE.loss({**out, "pred": wrong_where_hidden}, sub, cfg.loss, state) > loss + 1


def test_norm_pix_targets_are_each_patch_normalised_by_hand_for_13_bands():
    torch.manual_seed(0)
    images = torch.rand(2, BANDS, 4, 4) * 3000  # (B, C, S, S), 2 px patches: a 2 x 2 grid
    target, raw = reconstruction_targets(images, 2, norm_pix=True), reconstruction_targets(images, 2, norm_pix=False)
    assert target.shape == (2, 4, 2 * 2 * BANDS)
    for b in range(2):
        for row in range(2):
            for col in range(2):
                pixels = images[b, :, 2 * row: 2 * row + 2, 2 * col: 2 * col + 2].permute(1, 2, 0).reshape(-1)
                variance = ((pixels - pixels.mean()) ** 2).sum() / (len(pixels) - 1)
                torch.testing.assert_close(raw[b, 2 * row + col], pixels)
                torch.testing.assert_close(target[b, 2 * row + col], (pixels - pixels.mean()) / (variance + 1e-6).sqrt())
    assert torch.equal(unpatchify(patchify(images, 2), 2, BANDS), images)

    cfg = _config(f"model.in_chans={BANDS}")
    model = _model(cfg)
    sub = {"image": torch.rand(2, BANDS, 32, 32), "image_id": ["a", "b"]}
    out = model({"mae": sub})["mae"]
    assert out["pred"].shape == (2, PATCHES, PATCH * PATCH * BANDS)
    assert torch.isfinite(MAE.loss(out, sub, cfg.loss, MAE.loss_state(cfg, None)))


def test_it_learns_a_fixed_batch_and_runs_in_bf16():
    cfg = _config()
    model = _model(cfg)
    ramp = torch.linspace(0, 1, 32)
    images = torch.stack([ramp[None, :] * ramp[:, None] * k for k in (1.0, -1.0, 0.5, 2.0)])  # (4, 32, 32) smooth
    sub = {"image": images[:, None].expand(-1, 3, -1, -1), "image_id": list("abcd"), MASK_NOISE: torch.rand(4, PATCHES)}
    state = MAE.loss_state(cfg, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = MAE.loss(model({"mae": sub})["mae"], sub, cfg.loss, state)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # train.precision=bf16-autocast: fp32 mask token, bf16 tokens
        loss = MAE.loss(model({"mae": sub})["mae"], sub, cfg.loss, state)
    loss.backward()
    for p in model.parameters():  # train.precision=bf16: DeepSpeed's bf16 weights (its buffers stay fp32) and images
        p.data = p.data.bfloat16()
    out = model({"mae": {**sub, "image": sub["image"].bfloat16()}})["mae"]
    assert torch.isfinite(loss) and torch.isfinite(MAE.loss(out, sub, cfg.loss, state))


# ---- through the Trainer ----


def test_alone_on_an_unlabeled_13_band_corpus_a_resume_continues_bit_for_bit(store, tmp_path):
    """Only mae, on images without any label: 4 steps straight, and from the step-2 checkpoint in a new Trainer;
    the masks of steps 3 and 4 are drawn again from the reseeded RNG, so the weights are the same bits."""
    from spatialnet_dist.data.vocab import build_vocabs

    cfg = _unlabeled_config(store, "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1",
                            "eval.every=0", "eval.at_end=false", "optim.warmup_steps=0", "optim.lr=1e-3")
    vocabs = build_vocabs(cfg)
    straight = RecordingReporter(tmp_path)
    _trainer(cfg, vocabs, straight).fit()
    assert all(np.isfinite(m["mae_loss"]) and m["samples_per_s/mae"] > 0 for m in straight.metrics)
    resumed = RecordingReporter(tmp_path / "resumed")
    trainer = _trainer(cfg, vocabs, resumed)
    assert trainer.restore(tmp_path / "step-2") == 2
    trainer.fit()
    final, again = straight.weights[4], resumed.weights[4]
    assert all(torch.equal(again[k], final[k]) for k in final)
    assert not all(torch.equal(straight.weights[2][k], final[k]) for k in final)  # steps 3 and 4 trained


def test_beside_classification_under_zero_3_it_trains_validates_and_shows_reconstructions(store, tmp_path):
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.evaluate.run import ValidationPass

    cfg = _config(f"data.root={store}", "data.loader_workers=0", "train.cpus_per_worker=1",
                  *[o for o in OTHER_TASKS if "classification" not in o], "tasks.mae.batch_size=2",
                  "tasks.classification.batch_size=2", "train.zero_stage=3", "train.max_steps=2",
                  "train.checkpoint_every=2", "train.log_every=1", "eval.every=2", "eval.val_batches=1",
                  "eval.at_end=false")
    vocabs = build_vocabs(cfg)
    reporter = RecordingReporter(tmp_path)
    _trainer(cfg, vocabs, reporter, ValidationPass).fit()
    last = reporter.metrics[-1]
    assert all(np.isfinite(m[f"{t}_loss"]) for m in reporter.metrics for t in ("mae", "classification"))
    assert {"val/mae_loss", "val/mae_reconstruction_MSE", "val/classification_accuracy"} <= last.keys()
    (step, samples), = reporter.samples
    shown = [s for s in samples if "reconstruction" in s]
    assert step == 2 and shown and all(s["reconstruction"].shape == (32, 96, 3) for s in shown)
    assert all(s["reconstruction_MSE"] >= 0 for s in shown)


def test_a_13_band_pretraining_fine_tunes_a_13_band_classifier_through_the_trainer(world_of_one, tmp_path):  # noqa: F811
    """mae on the unlabeled 13-band corpus, its checkpoint published as a run's; a classification Trainer on a labelled
    13-band corpus with model.pretrained naming it starts from every pretrained encoder weight and trains."""
    from spatialnet_dist import checkpoint as ckpt
    from spatialnet_dist.data.vocab import build_vocabs

    root = str(tmp_path / "shards")
    write_unlabeled(root)
    write_labelled(root)
    steps = ["train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1", "eval.every=0", "eval.at_end=false"]
    pretraining = RecordingReporter(tmp_path)
    _trainer(cfg := _unlabeled_config(root, *steps), build_vocabs(cfg), pretraining).fit()
    url = ckpt.publish(tmp_path / "step-2", str(tmp_path / "runs" / "pretrain"), 2, rank=0, keep=0)
    fine_cfg = _unlabeled_config(root, *steps, "tasks.mae.enabled=false", "tasks.classification.enabled=true",
                                 "tasks.classification.corpora=[labelled]", "tasks.classification.batch_size=2",
                                 f"model.pretrained={url}")
    fine = RecordingReporter(tmp_path / "fine")
    trainer = _trainer(fine_cfg, build_vocabs(fine_cfg), fine)
    encoder, pretrained = trainer.engine.module.encoder.state_dict(), pretraining.weights[2]
    assert encoder["patch_embed.proj.weight"].shape[1] == BANDS  # (D, 13, 8, 8)
    assert all(torch.equal(v, pretrained[f"encoder.{k}"]) for k, v in encoder.items())
    assert sorted(trainer.engine.module.heads) == ["classification"]
    trainer.fit()
    assert [m["step"] for m in fine.metrics] == [1, 2] and all(np.isfinite(m["classification_loss"]) for m in fine.metrics)


# ---- evaluation ----


def test_evaluation_rows_are_per_image_on_any_world_size_and_reach_files_and_report(store, tmp_path):
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.evaluate.run import REPORT_IMAGES, _merge, finish, predict_split

    cfg = _unlabeled_config(store)
    vocabs = build_vocabs(cfg)
    model = _model(cfg)
    alone = predict_split(model, cfg, vocabs, "test")
    rows = sorted(alone.rows["mae"], key=MAE.row_key)
    assert len(rows) == SPLITS["test"] and sum("reconstruction" in r for r in rows) == REPORT_IMAGES
    shared = _merge([predict_split(model, cfg, vocabs, "test", rank, 2).rows for rank in range(2)], alone.images)
    # each image masked by its id's noise: its error is the same in any batch on any rank
    assert [r["mse"] for r in shared.rows["mae"]] == pytest.approx([r["mse"] for r in rows], rel=1e-5)

    metrics = finish(alone, cfg, vocabs, str(tmp_path / "eval"))
    assert metrics["mae"] == {"reconstruction_MSE": pytest.approx(np.mean([r["mse"] for r in rows])),
                              "n": SPLITS["test"]}
    files = json.loads((tmp_path / "eval" / "predictions" / "mae.json").read_text())
    assert len(files) == SPLITS["test"] and all(set(r) == {"image_id", "mse"} for r in files)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "### Masked autoencoding" in report and "(original, masked, reconstructed)" in report
    assert (tmp_path / "eval" / "samples.png").is_file()


# ---- config ----


@pytest.mark.parametrize("override, message", [
    ("tasks.mae.mask_ratio=1.0", "config key tasks.mae.mask_ratio: 1.0 is not allowed (expected in (0, 1))"),
    ("tasks.mae.mask_ratio=0", "config key tasks.mae.mask_ratio: 0.0 is not allowed (expected in (0, 1))"),
    ("tasks.mae.decoder_depth=0", "config key tasks.mae.decoder_depth: 0 is not allowed (expected >= 1)"),
    ("tasks.mae.decoder_dim=100",
     "config key tasks.mae.decoder_dim: 100 is not allowed (expected a multiple of 32, >= 32)"),
    ("tasks.mae.norm_pix_loss=3", "config key tasks.mae.norm_pix_loss: expected true or false, got 3"),
    ("tasks.mae.mask_rate=0.5", "unknown config key tasks.mae.mask_rate (did you mean tasks.mae.mask_ratio?)"),
])
def test_a_bad_mae_key_is_a_one_line_error_naming_it(override, message):
    with pytest.raises(ConfigError) as e:
        config_mod.load(None, [override])
    assert str(e.value) == message


def test_it_is_off_by_default_and_its_validation_metrics_are_lower_better():
    cfg = config_mod.Config()
    assert not cfg.tasks.mae.enabled and "mae" not in registry.DEFAULT_TASKS
    assert (cfg.tasks.mae.mask_ratio, cfg.tasks.mae.decoder_depth, cfg.tasks.mae.decoder_dim,
            cfg.tasks.mae.norm_pix_loss) == (0.75, 2, 128, True)
    assert registry.validation_metrics(["mae"]) == ["mae_loss", "mae_reconstruction_MSE"]
    assert not registry.higher_is_better("mae_reconstruction_MSE")
    best = _config("eval.keep_best=mae_reconstruction_MSE", "eval.every=10", "train.checkpoint_every=10")
    assert best.eval.keep_best == "mae_reconstruction_MSE"
