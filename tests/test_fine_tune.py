"""Fine-tuning from this project's own pretraining (docs/training.md "Pretrain, then fine-tune"): `model.pretrained` names a
checkpoint directory (its EMA when it holds one) or an exported bundle; the encoder loads exactly, its position
embedding resampled to the new image size, the heads start fresh, and a band count that differs is an error
naming both. The model-free tests lay a ZeRO-0 checkpoint out as the Trainer does (DeepSpeed's model-states file
stood in for); the slow one pretrains with the real Trainer under ZeRO-0, 2 and 3 and fine-tunes through it."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from harness import as_torchrun_worker, spawn_ranks
from timm.layers import resample_abs_pos_embed

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist import config as config_mod
from spatialnet_dist.checkpoint_weights import (
    consolidated_weights,
    export_bundle,
    is_pretraining_source,
    load_model,
    pretraining_weights,
)
from spatialnet_dist.errors import UserError
from spatialnet_dist.model.spatialnet import build_model
from spatialnet_dist.networks.encoder import meta_encoder
from spatialnet_dist.text import AnswerVocab, TextVocabs, Vocab
from spatialnet_dist.train import preflight

VOCABS = TextVocabs(Vocab.build({"a": 2, "roof": 1}), AnswerVocab(["yes", "no"], "exact"), ["farm", "forest", "lake"])
BANDS = 13


def pretraining_config(**model) -> config_mod.Config:
    cfg = config_mod.Config()
    cfg.model = replace(cfg.model, **{"image_size": 32, "in_chans": BANDS, **model})
    return cfg


def pretrained_checkpoint(run: Path, cfg: config_mod.Config, ema: bool = False, run_url: str = "") -> tuple[str, dict]:
    """A run's checkpoint-000005 of a model of cfg with classification and captioning heads, laid out as
    Trainer.save and checkpoint.publish write it at ZeRO-0 (under `run`, or `run_url`: s3://) -> (its URL, the
    weights it is fine-tuned from)."""
    torch.manual_seed(1)
    model = build_model(cfg.model, ["classification", "captioning"], VOCABS)
    local = run.parent / f"{run.name}-staging"  # this rank's files before publish
    (local / ckpt.ZERO_DIR / ckpt.ZERO_TAG).mkdir(parents=True)
    torch.save({"module": model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}}},
               local / ckpt.ZERO_DIR / ckpt.ZERO_TAG / "mp_rank_00_model_states.pt")  # DeepSpeed's file at ZeRO-0
    averaged = {k: v + 0.5 for k, v in model.state_dict().items()} if ema else None
    ckpt.write_common(local, {"step": 5, "world_size": 1}, cfg, VOCABS, averaged)
    url = ckpt.publish(local, run_url or str(run), 5, rank=0, keep=0)
    return url, averaged or model.state_dict()


def fine_tuned(pretrained: str, seed: int = 2, **model):
    """A classification model at 64 px (a 4x4 token grid where pretraining had 2x2) built as the Trainer builds it."""
    cfg = pretraining_config(image_size=64, pretrained=pretrained, **model)
    torch.manual_seed(seed)
    return build_model(cfg.model, ["classification"], VOCABS, pretraining=pretraining_weights(pretrained))


def assert_encoder_from(model, weights: dict) -> None:
    encoder = model.encoder.state_dict()
    source = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    assert encoder.keys() == source.keys()
    assert all(torch.equal(encoder[k], source[k]) for k in source if k != "pos_embed")
    # 1 class token + 2x2 patches -> 1 + 4x4, by timm's resampling
    assert encoder["pos_embed"].shape == (1, 17, meta_encoder("tiny").embed_dim)
    assert torch.equal(encoder["pos_embed"], resample_abs_pos_embed(source["pos_embed"], (4, 4), num_prefix_tokens=1))


@pytest.mark.parametrize("ema", [False, True])
def test_a_checkpoint_directory_and_its_bundle_load_the_encoder_and_leave_the_heads_fresh(tmp_path, ema):
    url, weights = pretrained_checkpoint(tmp_path / "runs" / "pre", pretraining_config(), ema=ema)
    assert url.endswith("checkpoint-000005") and is_pretraining_source(url)
    model = fine_tuned(url)
    assert_encoder_from(model, weights)  # with an EMA: the averaged weights, as evaluation and export take them
    scratch = fine_tuned("")
    assert all(torch.equal(v, scratch.heads.state_dict()[k]) for k, v in model.heads.state_dict().items())
    assert not torch.equal(model.heads["classification"].fc.weight, weights["heads.classification.fc.weight"])

    bundle = export_bundle(url, tmp_path / "bundle")
    assert_encoder_from(fine_tuned(str(bundle)), weights)
    preflight.check_sources(pretraining_config(pretrained=url))
    preflight.check_sources(pretraining_config(pretrained=str(bundle)))


@pytest.mark.slow  # moto's S3 server
def test_a_checkpoint_on_s3_loads_as_a_local_one(tmp_path, s3_bucket):
    url, weights = pretrained_checkpoint(tmp_path / "pre", pretraining_config(), run_url=f"s3://{s3_bucket}/runs/pre")
    assert url == f"s3://{s3_bucket}/runs/pre/checkpoint-000005"
    preflight.check_sources(pretraining_config(pretrained=url))
    assert_encoder_from(fine_tuned(url), weights)


def test_a_band_count_that_differs_is_an_error_naming_both(tmp_path):
    url, _ = pretrained_checkpoint(tmp_path / "runs" / "pre", pretraining_config())
    with pytest.raises(UserError, match=rf"model.pretrained: {url}: pretrained on 13 bands, but model.in_chans is 3"):
        fine_tuned(url, in_chans=3)
    rgb, weights = pretrained_checkpoint(tmp_path / "runs" / "rgb", pretraining_config(in_chans=3))
    with pytest.raises(UserError, match=rf"{rgb}: pretrained on 3 bands, but model.in_chans is 13") as err:
        fine_tuned(rgb)
    assert "\n" not in str(err.value)
    # Weights from elsewhere keep timm's adaptation: the same RGB weights as a file load into 13 bands.
    torch.save(weights, tmp_path / "rgb.pt")
    kernel = fine_tuned(str(tmp_path / "rgb.pt")).encoder.patch_embed.proj.weight  # (D, 13, 16, 16)
    assert kernel.shape[1] == BANDS
    torch.testing.assert_close(kernel[:, :3] * BANDS / 3, weights["encoder.patch_embed.proj.weight"])


def test_a_stem_of_the_other_kind_starts_fresh_and_the_blocks_load(tmp_path):
    url, weights = pretrained_checkpoint(tmp_path / "runs" / "pre", pretraining_config())  # a patch stem
    model, scratch = fine_tuned(url, stem="conv"), fine_tuned("", stem="conv")
    assert torch.equal(model.encoder.blocks[2].attn.qkv.weight, weights["encoder.blocks.2.attn.qkv.weight"])
    assert all(torch.equal(v, scratch.encoder.patch_embed.state_dict()[k])
               for k, v in model.encoder.patch_embed.state_dict().items())


def test_what_is_not_a_pretraining_is_refused_by_name(tmp_path):
    run = tmp_path / "runs" / "pre"
    url, _ = pretrained_checkpoint(run, pretraining_config())
    with pytest.raises(UserError, match=rf"model.pretrained: {run} is a run directory: name one of its checkpoints, "
                                        rf"e.g. {url}"):
        fine_tuned(str(run))
    with pytest.raises(UserError, match=f"model.pretrained: {run}"):
        preflight.check_sources(pretraining_config(pretrained=str(run)))
    os.remove(Path(url) / ckpt.MANIFEST)  # a partial save
    with pytest.raises(UserError, match=rf"model.pretrained: checkpoint {url}: no manifest.json: a partial save"):
        fine_tuned(url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a checkpoint nor a bundle"):
        fine_tuned(str(tmp_path / "empty"))


def test_a_fine_tuned_model_loads_without_the_pretraining_it_started_from(tmp_path):
    """Evaluation, prediction and export take every weight from the fine-tuned checkpoint: the pretraining that
    model.pretrained names in its config is not read again, so it may be pruned or left on another cluster."""
    url, _ = pretrained_checkpoint(tmp_path / "runs" / "pre", pretraining_config())
    cfg = pretraining_config(image_size=64, pretrained=str(tmp_path / "gone" / "checkpoint-000300"))
    torch.manual_seed(3)
    model = build_model(replace(cfg.model, pretrained=""), ["classification"], VOCABS)
    out = tmp_path / "fine-tuned"
    out.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / ckpt.BUNDLE_WEIGHTS))
    cfg.tasks.captioning.enabled = cfg.tasks.vqa.enabled = cfg.tasks.regression.enabled = False
    (out / ckpt.CONFIG).write_text(cfg.to_yaml())
    VOCABS.save(out)
    loaded, loaded_cfg, _ = load_model(str(out))
    assert loaded_cfg.model.pretrained.endswith("checkpoint-000300")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# ---- the real Trainer: pretrain under ZeRO-0, 2 and 3, fine-tune from each checkpoint ----


def _pretrain_then_fine_tune_worker(rank: int, port: int, root: str, runs: str, out: str):
    as_torchrun_worker(0, 1, port)
    from spatialnet_dist import engine as ds
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.evaluate.run import ValidationPass
    from spatialnet_dist.train.local import LocalReporter, train
    from spatialnet_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    ds.init_distributed(False)
    common = [f"data.root={root}", "data.loader_workers=0", "model.image_size=32", "eval.every=0", "eval.at_end=false",
              "optim.warmup_steps=1", "train.cpus_per_worker=1", "tasks.captioning.batch_size=4",
              "tasks.classification.batch_size=4", "tasks.vqa.enabled=false", "tasks.regression.enabled=false"]
    report = {}
    for stage in (0, 2, 3):
        run = f"{runs}/pre-{stage}"
        ema = ["optim.ema_decay=0.9"] if stage < 3 else []  # the EMA runs under ZeRO 0-2
        cfg = config_mod.load(None, [*common, *ema, f"run.storage={runs}", f"train.zero_stage={stage}",
                                     "train.max_steps=2", "train.checkpoint_every=2"])
        vocabs = build_vocabs(cfg)
        trained = train(cfg, vocabs, run, rank, 1, ValidationPass)
        pretrained = {k: v.detach().clone() for k, v in trained.inference_model().state_dict().items()}
        fine_cfg = config_mod.load(None, [*common, f"run.storage={runs}", "train.zero_stage=0", "train.max_steps=2",
                                          "model.image_size=64", f"model.pretrained={run}/checkpoint-000002",
                                          "tasks.captioning.enabled=false"])
        fine = Trainer.build(fine_cfg, build_vocabs(fine_cfg), rank, 1, LocalReporter(f"{runs}/fine-{stage}", rank, fine_cfg), None)
        encoder = fine.engine.module.encoder.state_dict()
        source = {k.removeprefix("encoder."): v for k, v in pretrained.items() if k.startswith("encoder.")}
        report[stage] = {
            "same_keys": encoder.keys() == source.keys(),
            "equal": sorted(k for k in source if k != "pos_embed" and torch.equal(encoder[k], source[k])),
            "pos_embed_resampled": torch.equal(encoder["pos_embed"], resample_abs_pos_embed(
                source["pos_embed"], (4, 4), num_prefix_tokens=1)),
            "heads": sorted(fine.engine.module.heads),
            "ema_taken": bool(ema) and not torch.equal(
                pretrained["encoder.blocks.0.attn.qkv.weight"],
                consolidated_weights(Path(run, "checkpoint-000002"))["encoder.blocks.0.attn.qkv.weight"]),
        }
        report[stage]["others"] = len(source) - 1 - len(report[stage]["equal"])
    Path(out, "report.json").write_text(json.dumps(report))


@pytest.mark.slow  # three short trainings and three fine-tuning engines in a spawned process
def test_fine_tuning_starts_from_a_real_zero_0_2_and_3_pretraining(tmp_path, free_ports):

    from spatialnet_dist.corpora.synthetic import write_synthetic

    root = str(tmp_path / "shards")
    write_synthetic(root, images=40, seed=0, shard_size=10)
    spawn_ranks(_pretrain_then_fine_tune_worker, args=(free_ports(1)[0], root, str(tmp_path / "runs"), str(tmp_path)),
             nprocs=1)
    report = json.loads((tmp_path / "report.json").read_text())
    for stage, r in report.items():
        assert r["same_keys"] and r["others"] == 0 and r["pos_embed_resampled"], stage
        assert r["heads"] == ["classification"], stage
        assert r["ema_taken"] == (stage != "3"), stage  # the EMA, not the raw weights, where the run kept one
