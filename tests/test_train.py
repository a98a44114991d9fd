"""Distributed training: input errors before any worker starts, DeepSpeed ZeRO engines under gloo, and a Ray Train
run that a full disk ends. (A worker killed under Ray, with S3: tests/test_chaos.py; a killed ZeRO-3 run:
tests/test_resume_data.py.)"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from harness import TINY, as_torchrun_worker, result_line, sets, spawn_ranks

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist import jobs
from spatialnet_dist.train import launch
from spatialnet_dist.train.rundir import RunDir


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> str:
    from spatialnet_dist.corpora.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("store") / "shards"
    write_synthetic(str(root), images=40, seed=0, shard_size=10)
    return str(root)


# ---- input errors stop before any worker starts ----


def test_bad_config_is_one_line_and_fast(capsys):
    t0 = time.time()
    assert jobs.train_with_ray(["--set", "train.zero_stage=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zero_stage" in err
    assert time.time() - t0 < 30


def test_unknown_key_names_the_closest(capsys):
    assert jobs.train_with_ray(["--set", "train.max_step=5"]) == 2
    assert "train.max_steps" in capsys.readouterr().err


def test_missing_corpus_names_it(synth_root, capsys):
    code = jobs.train_with_ray(sets(f"data.root={synth_root}", "tasks.vqa.corpora=[rsvqa-lr]"))
    assert code == 2
    err = capsys.readouterr().err
    assert "rsvqa-lr" in err and "convert" in err


def test_missing_bucket_is_one_clear_line(synth_root, s3_endpoint, capsys):
    code = jobs.train_with_ray(sets(f"data.root={synth_root}", "run.storage=s3://no-such-bucket/runs"))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-bucket" in err and "Traceback" not in err


def test_driver_resolves_epochs_and_global_batch_before_workers_start(synth_root, tmp_path, monkeypatch, capsys):
    """The Ray driver prints the plan line, saves the resolved config (max_steps from train.epochs, the
    per-worker batch from the global one) and hands that config to the workers."""
    from types import SimpleNamespace

    from spatialnet_dist import config as config_mod
    from spatialnet_dist.store.manifest import read_manifest

    handed = {}

    def fake_training(cfg, vocab, run_dir, train_loop):
        handed["config"] = cfg
        return SimpleNamespace(error=None, checkpoint=None)

    monkeypatch.setattr(launch, "connect_ray", lambda cfg: False)
    monkeypatch.setattr(launch, "run_training", fake_training)
    code = jobs.train_with_ray(sets(f"data.root={synth_root}", f"run.storage={tmp_path}", "eval.at_end=false",
                            "train.epochs=2", "train.num_workers=2", "tasks.captioning.global_batch_size=8",
                            "tasks.vqa.batch_size=3", "tasks.vqa.questions_per_image=1"))
    assert code == 0
    questions = read_manifest(synth_root, "synthetic")["splits"]["train"]["questions"]
    steps = -(-2 * questions // (3 * 2))
    out = capsys.readouterr().out
    assert f"train.epochs=2 -> train.max_steps={steps}; rows per epoch: " in out
    assert "batch_size per worker = global_batch_size / (2 workers x 1 accum): captioning 4" in out
    saved = config_mod.from_dict(yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text()))
    assert handed["config"] == saved
    assert saved.train.max_steps == steps and saved.tasks.captioning.batch_size == 4


def test_a_finished_run_is_not_run_again_unless_given_more_to_do(synth_root, tmp_path, monkeypatch, capsys):
    """A second job on a run directory whose run finished its max_steps starts no worker: a line saying the run is
    complete and how to start another, then the run's RESULT line again. More steps, or an evaluation the run did
    not do, and the job runs (Ray's workers resume the run from its last checkpoint)."""
    from types import SimpleNamespace

    trained = []

    def training_to_the_end(cfg, vocab, run_dir, train_loop):
        trained.append(cfg.train.max_steps)
        RunDir(run_dir).append_metrics({"step": cfg.train.max_steps, "loss": 1.0})
        return SimpleNamespace(error=None)

    monkeypatch.setattr(launch, "connect_ray", lambda cfg: False)
    monkeypatch.setattr(launch, "run_training", training_to_the_end)
    args = sets(f"data.root={synth_root}", f"run.storage={tmp_path}", "eval.at_end=false", "train.max_steps=4")
    assert jobs.train_with_ray(args) == 0 and trained == [4]
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert result_line(first)["final_step"] == 4 and RunDir(str(tmp_path / "demo")).describe()["state"] == "finished"

    assert jobs.train_with_ray(args) == 0 and trained == [4]
    said, again = capsys.readouterr().out.strip().splitlines()[-2:]
    assert again == first
    assert said.startswith(f"{tmp_path / 'demo'}: this run is complete at step 4, nothing left to do")
    assert "--set run.name=<another name>" in said

    assert jobs.train_with_ray(args + sets("train.max_steps=6")) == 0 and trained == [4, 6]
    assert jobs.train_with_ray(args + sets("train.max_steps=6", "eval.at_end=true")) == 0 and trained == [4, 6, 6]


# ---- the Trainer under torch.distributed, without Ray ----


def _fine_tune_worker(rank: int, port: int, out: str):
    """One rank under gloo: for ZeRO-2 and ZeRO-3, one step of a tiny model with 2 of 4 blocks frozen and
    layer_decay 0.5 -> what the engine's optimizer holds and what the step changed."""
    as_torchrun_worker(0, 1, port)
    from spatialnet_dist import config as config_mod
    from spatialnet_dist import engine as ds
    from spatialnet_dist.model.spatialnet import assemble_model
    from spatialnet_dist.networks.heads import VocabSizes
    from spatialnet_dist.objective import MultiTaskObjective

    torch.set_num_threads(1)
    ds.init_distributed(False)
    report = {}
    for stage in (2, 3):
        cfg = config_mod.load(None, ["model.image_size=32", f"train.zero_stage={stage}", "optim.layer_decay=0.5",
                                     "model.freeze_encoder_blocks=2", "optim.warmup_steps=0", "optim.lr=1e-3",
                                     "train.max_steps=10"])

        def build(model_cfg=cfg.model):
            torch.manual_seed(0)
            return assemble_model(model_cfg, ["classification"], VocabSizes(words=20, answers=4, classes=5))

        model = build()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        frozen = {k for k, v in model.named_parameters() if not v.requires_grad}
        trainable = sum(v.numel() for v in model.parameters() if v.requires_grad)
        engine = ds.create_engine(cfg, model, 1)
        batch = {"classification": {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3])}}
        engine.backward(MultiTaskObjective(cfg.loss)(engine(batch), batch, engine.module)["loss"])
        engine.step()
        optimizer = engine.optimizer
        handed = optimizer.fp16_groups if stage == 3 else optimizer.bit16_groups
        after = dict(ds.full_model(engine, build).named_parameters())
        report[stage] = {
            "lr": [[g["lr"], g["lr_scale"]] for g in optimizer.param_groups],
            "expected_peak": cfg.optim.lr * ds.lr_lambda(cfg)(1),
            "handed": sum(getattr(p, "ds_numel", p.numel()) for group in handed for p in group),
            "trainable": trainable,
            "frozen_kept": bool(frozen) and all(torch.equal(after[k], before[k]) for k in frozen),
            "trained_changed": sorted(k for k in before if k not in frozen and not torch.equal(after[k], before[k])),
        }
    Path(out, "report.json").write_text(json.dumps(report))


@pytest.mark.slow  # DeepSpeed ZeRO-2 and ZeRO-3 engines in spawned processes: ~15 s
def test_freeze_and_layer_decay_under_zero2_and_zero3(tmp_path, free_ports):
    """The real DeepSpeed engine (one rank, gloo): frozen parameters are not handed to the optimizer and
    stay as they were; after one step each param group's lr is the peak lr x its layer-decay factor."""

    spawn_ranks(_fine_tune_worker, args=(free_ports(1)[0], str(tmp_path)), nprocs=1)
    report = json.loads((tmp_path / "report.json").read_text())
    for stage, r in report.items():
        assert r["handed"] == r["trainable"], stage
        assert r["frozen_kept"], stage
        assert {"encoder.blocks.3.mlp.fc1.weight", "encoder.blocks.2.attn.qkv.weight", "encoder.norm.weight",
                "heads.classification.fc.weight"} <= set(r["trained_changed"]), stage
        # tiny has 4 blocks; blocks 0-1 and the stem are frozen: block 3 x0.5, block 2 x0.25, norm and head x1.
        assert sorted({scale for _, scale in r["lr"]}) == [0.25, 0.5, 1.0], stage
        assert r["lr"][0][1] == 1.0
        for lr, scale in r["lr"]:
            assert lr == pytest.approx(r["expected_peak"] * scale, rel=1e-9), stage


def _engine_against_bare_worker(rank: int, port: int, out: str):
    """One rank under gloo: the ZeRO-2 engine as create_engine builds it for CPU, and a bare torch loop
    (same parameter groups, AdamW, clipping, schedule), 3 steps each on one batch -> their losses and the
    largest parameter difference."""
    as_torchrun_worker(0, 1, port)
    from spatialnet_dist import config as config_mod
    from spatialnet_dist import engine as ds
    from spatialnet_dist.model.spatialnet import assemble_model
    from spatialnet_dist.networks.heads import VocabSizes
    from spatialnet_dist.objective import MultiTaskObjective

    torch.set_num_threads(1)
    ds.init_distributed(False)
    cfg = config_mod.load(None, ["model.image_size=32", "train.zero_stage=2", "optim.warmup_steps=1",
                                 "optim.lr=1e-3", "optim.grad_clip=0.05", "train.max_steps=3"])

    def build():
        torch.manual_seed(0)
        return assemble_model(cfg.model, ["classification"], VocabSizes(words=20, answers=4, classes=5))

    objective = MultiTaskObjective(cfg.loss)
    batch = {"classification": {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3])}}
    engine = ds.create_engine(cfg, build(), 1)
    bare = build()
    groups = ds.param_groups(bare, cfg.optim.lr, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, ds.lr_lambda(cfg))
    losses = {"engine": [], "bare": []}
    for _ in range(3):
        loss = objective(engine(batch), batch, engine.module)["loss"]
        engine.backward(loss)
        engine.step()
        losses["engine"].append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss = objective(bare(batch), batch, bare)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()
        losses["bare"].append(loss.item())
    trained = dict(engine.module.named_parameters())
    diff = max((trained[k] - v).abs().max().item() for k, v in bare.named_parameters())
    moved = max((trained[k] - v).abs().max().item() for k, v in build().named_parameters())
    Path(out, "report.json").write_text(json.dumps({"losses": losses, "max_diff": diff, "max_moved": moved}))


@pytest.mark.slow  # a DeepSpeed engine and a bare loop in a spawned process: ~15 s
def test_zero2_engine_on_cpu_steps_like_a_bare_torch_loop(tmp_path, free_ports):
    """The CPU engine config (ZeRO-2 without contiguous gradients, bench/overhead.py) changes cost, not
    training: the same losses and parameters as torch's AdamW + clipping + schedule, step by step."""

    spawn_ranks(_engine_against_bare_worker, args=(free_ports(1)[0], str(tmp_path)), nprocs=1)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["losses"]["engine"] == pytest.approx(report["losses"]["bare"], rel=1e-5)
    assert report["max_moved"] > 1e-4  # the steps did change the weights
    assert report["max_diff"] < 1e-5


# ---- failure classes: what a retry cannot fix ends the run on that attempt ----


@pytest.mark.slow
def test_ray_a_full_run_disk_ends_the_run_in_one_line_and_a_rerun_resumes_the_checkpoint_before(
        synth_root, shared_ray, small_disk, capsys):
    """run.storage on a small disk that fills up once checkpoint 2 is complete: the next save finds no space; the
    run ends on that attempt (no restart although train.max_failures=2), exit 1, RESULT's error the one line with
    the path and the free space, and the last line of stderr; failures.json's cause disk_full, no partial
    checkpoint; the space freed, the same command resumes from the last checkpoint that fitted and ends at
    max_steps (tests/test_disk_full.py: each writer). Every permanent error ends a Ray run this way: the classes,
    tests/test_failures.py; the injected UserError and NonFiniteLoss, tests/test_trainer.py."""
    disk = small_disk.mount("1g")
    runs, filled = disk / "runs", []

    def fill_once_checkpoint_2_is_complete():
        deadline = time.time() + 900
        while time.time() < deadline and not filled:
            if (runs / "full" / "checkpoint-000002" / ckpt.MANIFEST).exists():
                filled.append(small_disk.fill(disk, leave=256 * 1024))
            time.sleep(0.05)

    threading.Thread(target=fill_once_checkpoint_2_is_complete, daemon=True).start()
    # Every checkpoint kept: a prune would free a checkpoint's room for the next, so a fill that came a save late
    # (the watcher runs beside the Ray driver in this process, slow under load) would let the run finish.
    args = sets(*TINY, f"data.root={synth_root}", f"run.storage={runs}", "run.name=full", "train.max_steps=8",
                "train.checkpoint_every=2", "run.keep_checkpoints=0", "log.tensorboard=false")
    code = jobs.train_with_ray(args)
    out, err = capsys.readouterr()
    result = result_line(out)
    assert filled, "checkpoint 2 never completed"
    assert code == 1 and result["restarts"] == 0, result
    assert result["error"].startswith(f"disk full: no space left writing {runs}/full/"), result
    assert "bytes free of" in result["error"] and err.strip().splitlines()[-1].endswith(result["error"])
    run = RunDir(str(runs / "full"))
    assert [f.get("cause") for f in run.failures()] == ["disk_full"]
    found = ckpt.checkpoints(run.url)
    assert found and all(complete for _, complete in found), found  # the one that did not fit: removed
    kept = int(found[-1][0].rsplit("-", 1)[1])
    assert 2 <= kept < 8 and [m["step"] for m in run.metrics()] == list(range(1, len(run.metrics()) + 1))

    filled[0].unlink()
    code = jobs.train_with_ray(args)
    result = result_line(capsys.readouterr().out)
    assert code == 0 and result["resumed_from"] == [kept] and result["final_step"] == 8, result
