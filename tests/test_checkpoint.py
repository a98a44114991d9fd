"""Checkpoints are visible only complete (files, then the manifest), resumes take the last complete one,
run.keep_checkpoints prunes partial leftovers, and loading checks every file's sha256 before anything
is unpickled. The model-free tests here use stand-in files; the slow one saves and resumes a real Trainer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import as_torchrun_worker, spawn_ranks

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist.errors import UserError
from spatialnet_dist.store import storage
from spatialnet_dist.train.rundir import BestCheckpoint, RunDir


class InjectedCrash(Exception):
    """Stands for the process dying at this step (nothing catches it, as nothing survives a kill)."""


def rank_files(directory: Path, step: int) -> dict[str, bytes]:
    """One rank's checkpoint files as Trainer.save lays them out (stand-in bytes); -> {relative path: bytes}."""
    files = {
        ckpt.META: json.dumps({"step": step}).encode(),
        ckpt.CONFIG: b"run: {}\n",
        "vocab.json": b"{}",
        "streams/rank-0.json": json.dumps({"step": step}).encode(),
        "zero/latest": b"ds",
        "zero/ds/mp_rank_00_model_states.pt": os.urandom(3000),
        "zero/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(5000),
    }
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    return files


def read_back(url: str) -> dict[str, bytes]:
    """The files `local_copy` hands over for a checkpoint URL (each checked against the manifest)."""
    with ckpt.local_copy(url) as d:
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


@contextmanager
def crash_at(monkeypatch, steps: list[tuple[object, str]], k: int | None):
    """Wrap every (owner, function name) in `steps`; the k-th call overall (from 0) raises InjectedCrash.
    Yields the calls made, as (name, its last path argument)."""
    calls: list[tuple[str, str]] = []
    with monkeypatch.context() as m:
        for owner, name in steps:
            real = getattr(owner, name)

            def step(*args, _real=real, _name=name, **kwargs):
                if len(calls) == k:
                    raise InjectedCrash(f"{_name} #{k}")
                calls.append((_name, [str(a) for a in args if isinstance(a, (str, Path))][-1]))
                return _real(*args, **kwargs)

            m.setattr(owner, name, step)
        yield calls


# The steps of a save: the write and the rename of each local file (storage.put_file, the manifest's
# storage.write_bytes_atomic) or each S3 upload, then pruning's deletions.
LOCAL_STEPS = [(shutil, "copyfile"), (os, "replace"), (storage, "delete"), (storage, "delete_prefix")]
S3_STEPS = [(storage, "put_file"), (storage, "write_bytes_atomic"), (storage, "delete"), (storage, "delete_prefix")]


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """-> (root URL for runs, the save steps to crash at)."""
    if request.param == "local":
        return str(tmp_path / "runs"), LOCAL_STEPS
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs", S3_STEPS


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.slow)], indirect=True)
def test_a_crash_at_every_step_of_a_save_leaves_a_complete_latest(backend, tmp_path, monkeypatch):
    root, steps = backend
    saved = {step: rank_files(tmp_path / f"step{step}", step) for step in (1, 2)}

    def run_with_first_checkpoint(name: str) -> str:
        run = storage.join(root, name)
        ckpt.publish(tmp_path / "step1", run, 1, rank=0, keep=1)
        return run

    run = run_with_first_checkpoint("dry")
    with crash_at(monkeypatch, steps, None) as calls:
        ckpt.publish(tmp_path / "step2", run, 2, rank=0, keep=1)
    # The step that makes the new checkpoint visible: the manifest's rename (local) or upload (S3).
    commit = next(i for i, (name, path) in enumerate(calls)
                  if name in ("replace", "write_bytes_atomic") and path.endswith(f"/{ckpt.MANIFEST}"))
    assert commit >= len(saved[2]) and len(calls) > commit + 1  # every file before it, pruning after

    survived = {1: 0, 2: 0}
    for k in range(len(calls)):
        run = run_with_first_checkpoint(f"crash-{k}")
        with pytest.raises(InjectedCrash), crash_at(monkeypatch, steps, k):
            ckpt.publish(tmp_path / "step2", run, 2, rank=0, keep=1)
        # What a resume finds: the save in flight counts only once its manifest is in place.
        latest = ckpt.latest_complete(run)
        step = 2 if k > commit else 1
        assert latest == storage.join(run, ckpt.checkpoint_name(step)), (k, calls[k])
        assert read_back(latest) == saved[step], (k, calls[k])
        survived[step] += 1
        # The next attempt prunes the leftovers before it trains, then saves again.
        ckpt.prune(run, keep=1)
        ckpt.publish(tmp_path / "step2", run, 2, rank=0, keep=1)
        expected = sorted(f"{ckpt.checkpoint_name(2)}/{rel}" for rel in [*saved[2], ckpt.MANIFEST])
        assert storage.list_files(run) == expected, (k, calls[k])
    print(f"crash points injected: {len(calls)} ({', '.join(sorted({n for n, _ in calls}))}); resumed from "
          f"the checkpoint before: {survived[1]}, from the one saved (crash while pruning): {survived[2]}")


def test_keep_checkpoints_applies_and_zero_keeps_all(tmp_path):
    run = str(tmp_path / "run")
    for step in (1, 2, 3):
        rank_files(tmp_path / f"step{step}", step)
        ckpt.publish(tmp_path / f"step{step}", run, step, rank=0, keep=2)
    assert [u.rsplit("/", 1)[1] for u, ok in ckpt.checkpoints(run)] == ["checkpoint-000002", "checkpoint-000003"]
    ckpt.publish(tmp_path / "step3", run, 4, rank=0, keep=0)
    assert len(ckpt.checkpoints(run)) == 3


def test_pruning_keeps_the_best_checkpoint_whatever_its_age(tmp_path):
    run = str(tmp_path / "run")
    best = storage.join(run, ckpt.checkpoint_name(2))
    for step in (1, 2, 3, 4):
        rank_files(tmp_path / f"step{step}", step)
        ckpt.publish(tmp_path / f"step{step}", run, step, rank=0, keep=1, best=best if step > 2 else None)
    assert [u.rsplit("/", 1)[1] for u, ok in ckpt.checkpoints(run)] == ["checkpoint-000002", "checkpoint-000004"]
    ckpt.prune(run, keep=1, best=best)  # an attempt's start
    assert len(ckpt.checkpoints(run)) == 2
    ckpt.prune(run, keep=1)  # without eval.keep_best: the last alone
    assert [u.rsplit("/", 1)[1] for u, ok in ckpt.checkpoints(run)] == ["checkpoint-000004"]


def _published_with_validation(tmp_path, run: RunDir, best: BestCheckpoint, step: int, metrics: dict) -> None:
    """What a reporter does at a checkpoint step (rank 0): publish, keeping the best so far, then weigh it."""
    rank_files(tmp_path / f"step{step}", step)
    ckpt.publish(tmp_path / f"step{step}", run.url, step, rank=0, keep=1, best=best.url)
    best.consider(step, metrics)


@pytest.mark.parametrize(("metric", "values", "best_step"), [
    ("classification_accuracy", [0.5, 0.75, 0.75, 0.25], 4),  # higher is better; a tie keeps the earlier
    ("vqa_loss", [2.0, 1.5, 1.75, 1.25], 8),  # lower is better
    ("regression_MAE", [3.0, 2.0, 2.5, float("nan")], 4),  # lower; a NaN never beats
])
def test_the_best_checkpoint_is_recorded_kept_and_known_to_a_resumed_run(tmp_path, metric, values, best_step):
    run = RunDir(str(tmp_path / "run"))
    best = BestCheckpoint(run, metric)
    for i, value in enumerate(values):
        step = 2 * (i + 1)
        _published_with_validation(tmp_path, run, best, step, {"step": step, f"val/{metric}": value, "loss": 1.0})
        _published_with_validation(tmp_path, run, best, step + 1, {"step": step + 1, "loss": 1.0})  # no validation
    assert best.step == best_step and best.url == run.path(ckpt.checkpoint_name(best_step))
    assert json.loads(Path(run.path("best.json")).read_text()) == {
        "step": best_step, "metric": metric, "value": values[best_step // 2 - 1]}
    kept = [u.rsplit("/", 1)[1] for u, ok in ckpt.checkpoints(run.url)]
    assert kept == sorted({ckpt.checkpoint_name(best_step), ckpt.checkpoint_name(9)})
    resumed = BestCheckpoint(run, metric)  # a restarted attempt
    assert resumed.record == best.record
    _published_with_validation(tmp_path, run, resumed, 10, {"step": 10, f"val/{metric}": values[best_step // 2 - 1]})
    assert resumed.step == best_step  # the best so far, from best.json, is what a new value must beat
    assert BestCheckpoint(run, "tagging_mAP_macro").record is None  # best.json ranks by another metric
    assert BestCheckpoint(run, "").url is None  # off
    ckpt.prune(run.url, keep=1)  # a job of this run directory without eval.keep_best
    assert BestCheckpoint(run, metric).record is None  # its checkpoint is gone


def altered(url: str, rel: str) -> None:
    path = Path(url) / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_file_altered_after_save_is_refused_before_anything_is_unpickled(tmp_path, monkeypatch, capsys):
    import numpy as np
    import torch
    from PIL import Image

    from spatialnet_dist.cli import main

    rank_files(tmp_path / "step1", 1)
    url = ckpt.publish(tmp_path / "step1", str(tmp_path / "run"), 1, rank=0, keep=1)
    shard = "zero/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    altered(url, shard)
    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)

    def unpickle(*args, **kwargs):
        raise AssertionError("torch.load ran before the checkpoint's files were checked")

    monkeypatch.setattr(torch, "load", unpickle)
    for argv in (["predict", url, str(image)], ["export", url, str(tmp_path / "bundle")],
                 ["eval", "run", url, "--data", str(tmp_path)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and shard in err and "sha256" in err, (argv, err)


def test_a_checkpoint_without_a_manifest_or_with_a_bad_one_is_refused(tmp_path):
    rank_files(tmp_path / "step1", 1)
    url = ckpt.publish(tmp_path / "step1", str(tmp_path / "run"), 1, rank=0, keep=1)
    manifest = Path(url) / ckpt.MANIFEST
    body = json.loads(manifest.read_text())
    body["files"]["../outside"] = {"sha256": "0" * 64, "bytes": 1}
    manifest.write_text(json.dumps(body))
    with pytest.raises(UserError, match=r"manifest.json: refused path '\.\./outside'"):
        read_back(url)
    manifest.unlink()  # a partial save, or a DeepSpeed checkpoint from elsewhere
    with pytest.raises(UserError, match="no manifest.json: .* refusing to unpickle it"):
        read_back(url)
    assert ckpt.latest_complete(str(tmp_path / "run")) is None


# ---- a damaged checkpoint: the resume falls back, never guesses ----


class StandInTrainer:
    """What checkpoint.resume restores into (train.trainer.Trainer's `restore`): the stand-in files' step."""

    def __init__(self, rank: int = 0):
        self.rank, self.world_size, self.step, self.samples_seen = rank, 2, 0, {}

    def restore(self, directory: Path, weights_only: bool = False) -> int:
        self.step = ckpt.read_meta(directory)["step"]
        return self.step


def _run_with_checkpoints(tmp_path, steps: tuple[int, ...] = (4, 8)) -> RunDir:
    """A run directory (config.yaml, one attempt) with a complete stand-in checkpoint at each of `steps`."""
    from spatialnet_dist import config as config_mod

    run = RunDir(str(tmp_path / "run"))
    run.write_config(config_mod.load(None, ["train.max_steps=8"]))
    run.record_attempt(0, False, 2)
    for step in steps:
        rank_files(tmp_path / f"step{step}", step)
        ckpt.publish(tmp_path / f"step{step}", run.url, step, rank=0, keep=0)
    return run


def _damage(url: str, how: str, rel: str) -> None:
    path = Path(url) / rel
    if how == "flipped":
        altered(url, rel)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-1])
    else:
        path.unlink()


SHARD = "zero/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.mark.parametrize(("how", "rel"), [("flipped", SHARD), ("truncated", ckpt.META),
                                          ("missing", "zero/ds/mp_rank_00_model_states.pt")])
def test_a_damaged_newest_checkpoint_is_passed_over_set_aside_kept_and_shown(tmp_path, capsys, how, rel):
    from spatialnet_dist.cli import main
    from spatialnet_dist.train.rundir import DAMAGED_CHECKPOINT

    run = _run_with_checkpoints(tmp_path)
    newest, before = (run.path(ckpt.checkpoint_name(s)) for s in (8, 4))
    _damage(newest, how, rel)
    damaged_files = {p.relative_to(newest).as_posix(): p.read_bytes() for p in Path(newest).rglob("*") if p.is_file()}
    # The driver plans with the newest checkpoint whose meta.json verifies; the workers check every file.
    assert ckpt.resumed_meta(run.url)["step"] == (4 if rel == ckpt.META else 8)

    other = StandInTrainer(rank=1)  # another rank: falls back too, and leaves the directories to rank 0
    assert ckpt.resume(other, run.url)["damaged"][0]["set_aside"] is None and Path(newest).is_dir()
    trainer = StandInTrainer(rank=0)
    resumed = ckpt.resume(trainer, run.url)
    aside = run.path("checkpoint-000008.damaged-1")
    assert trainer.step == other.step == 4 and resumed["checkpoint"] == before
    assert resumed["damaged"] == [{"checkpoint": newest, "file": rel, "reason": resumed["damaged"][0]["reason"],
                                   "set_aside": aside}]
    assert rel in resumed["damaged"][0]["reason"] and "\n" not in resumed["damaged"][0]["reason"]
    # Kept as it was, out of the run's checkpoints: a resume, the driver and pruning see the one before.
    assert {p.relative_to(aside).as_posix(): p.read_bytes() for p in Path(aside).rglob("*") if p.is_file()} \
        == damaged_files
    assert ckpt.latest_complete(run.url) == before and ckpt.resumed_meta(run.url)["step"] == 4

    lines = run.start_attempt(trainer.step, resumed, 2)
    assert len(lines) == 2 and rel in lines[0] and aside in lines[0] and lines[1].startswith(f"resumed from {before}")
    recorded = run.failures(DAMAGED_CHECKPOINT)
    assert [(f["class"], f["step"], f["checkpoint"], f["file"], f["set_aside"]) for f in recorded] == [
        (DAMAGED_CHECKPOINT, None, newest, rel, aside)]
    assert run.failures() == []  # no worker group failed: restart causes and repeated steps go by those
    assert run.attempts()[-1]["damaged"] == [{"checkpoint": newest, "file": rel, "set_aside": aside}]

    ckpt.prune(run.url, keep=1)  # keeps the one checkpoint that verifies; the damaged one is not counted
    assert [u for u, ok in ckpt.checkpoints(run.url)] == [before] and Path(aside).is_dir()
    rank_files(tmp_path / "again", 8)  # training reaches step 8 again: a new checkpoint, the damaged one kept
    ckpt.publish(tmp_path / "again", run.url, 8, rank=0, keep=1)
    assert [u for u, ok in ckpt.checkpoints(run.url)] == [newest] and read_back(newest)
    assert sorted(p.name for p in Path(run.url).glob("checkpoint-*")) == ["checkpoint-000008",
                                                                          "checkpoint-000008.damaged-1"]

    capsys.readouterr()
    assert main(["runs", "show", run.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["damaged_checkpoints"] == [{"checkpoint": aside, "file": rel}]
    assert main(["runs", "show", run.url]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("damaged:")]
    assert shown == [f"damaged:     {aside} ({rel} did not verify; kept for inspection)"]


def test_on_s3_a_damaged_checkpoint_is_set_aside_object_by_object(tmp_path, s3_bucket):
    run_url = f"s3://{s3_bucket}/runs/run"
    for step in (4, 8):
        rank_files(tmp_path / f"step{step}", step)
        ckpt.publish(tmp_path / f"step{step}", run_url, step, rank=0, keep=0)
    newest = storage.join(run_url, ckpt.checkpoint_name(8))
    held = {rel: storage.read_bytes(storage.join(newest, rel)) for rel in storage.list_files(newest)}
    storage.write_bytes_atomic(storage.join(newest, SHARD), held[SHARD][:-1])  # a truncated upload
    held[SHARD] = held[SHARD][:-1]
    resumed = ckpt.resume(StandInTrainer(), run_url)
    aside = storage.join(run_url, "checkpoint-000008.damaged-1")
    assert resumed["step"] == 4 and resumed["damaged"][0]["set_aside"] == aside
    assert {rel: storage.read_bytes(storage.join(aside, rel)) for rel in storage.list_files(aside)} == held
    assert storage.list_files(newest) == [] and ckpt.damaged_checkpoints(run_url) == [aside]


def test_resume_refuses_when_no_checkpoint_verifies_and_a_damaged_named_one(tmp_path):
    run = _run_with_checkpoints(tmp_path)
    newest, before = (run.path(ckpt.checkpoint_name(s)) for s in (8, 4))
    _damage(before, "flipped", SHARD)
    _damage(newest, "truncated", ckpt.META)
    with pytest.raises(UserError) as refused:
        ckpt.resume(StandInTrainer(), run.url, start_from=before)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"checkpoint {newest}: {ckpt.META} does not match")
    assert message.endswith("none of the run's 2 checkpoints verifies")
    assert [u for u, ok in ckpt.checkpoints(run.url)] == [before, newest]  # nothing moved, nothing deleted
    # train.resume names a checkpoint: damaged, it is refused (no other to fall back to is the user's choice).
    with pytest.raises(ckpt.DamagedCheckpoint, match=f"^checkpoint {before}: {SHARD} does not match"):
        ckpt.resume(StandInTrainer(), str(tmp_path / "new-run"), start_from=before)


# ---- a real Trainer: crashed at every step of a save, then resumed ----


def _resume_after_every_crash(rank: int, port: int, data_root: str, runs: str, backend: str, out: str):
    """One process (a world of one): a run of 2 steps with a checkpoint at each, its step-2 save crashed
    at every step in turn, then the same run started again. -> per crash point: the step resumed from,
    the final parameters' fingerprint, the checkpoint directories left."""
    as_torchrun_worker(0, 1, port)
    from spatialnet_dist import config as config_mod
    from spatialnet_dist import engine as ds
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.train.local import train

    ds.init_distributed(False)
    steps = LOCAL_STEPS if backend == "local" else S3_STEPS
    monkeypatch, real_publish = pytest.MonkeyPatch(), ckpt.publish

    def run(name: str, crash: int | None = None, calls: list | None = None):
        """Train run `name` to step 2 (with `crash`: its step-2 save dies at step `crash` of the save);
        -> the fingerprint of the parameters it ends with."""
        def publish(local_dir, run_url, step, rank, keep, best=None):
            if step != 2 or calls is None:
                return real_publish(local_dir, run_url, step, rank, keep, best)
            with crash_at(monkeypatch, steps, crash) as made:
                try:
                    return real_publish(local_dir, run_url, step, rank, keep, best)
                finally:
                    calls.extend(made)

        cfg = config_mod.load(None, [
            f"data.root={data_root}", f"run.storage={runs}", f"run.name={name}", "run.keep_checkpoints=1",
            "model.image_size=32", "data.loader_workers=0", "train.max_steps=2", "train.checkpoint_every=1",
            "train.log_every=1", "eval.every=0", "eval.at_end=false", "train.cpus_per_worker=1",
            *(f"tasks.{t}.batch_size=2" for t in ("captioning", "vqa", "classification", "regression"))])
        with monkeypatch.context() as m:
            m.setattr(ckpt, "publish", publish)
            trainer = train(cfg, build_vocabs(cfg), storage.join(runs, name), 0, 1, None)
        state = trainer.inference_model().state_dict()
        return hashlib.sha256(b"".join(state[k].detach().float().numpy().tobytes() for k in sorted(state))).hexdigest()

    calls: list = []
    uninterrupted = run("dry", None, calls)
    commit = next(i for i, (name, path) in enumerate(calls)
                  if name in ("replace", "write_bytes_atomic") and path.endswith(f"/{ckpt.MANIFEST}"))
    report = {"points": len(calls), "uninterrupted": uninterrupted, "resumed_from": [], "final": [], "left": []}
    for k in range(len(calls)):
        name = f"crash-{k}"
        try:
            run(name, k, [])
        except InjectedCrash:
            pass
        latest = ckpt.latest_complete(storage.join(runs, name))
        report["resumed_from"].append(int(latest.rsplit("-", 1)[1]))
        report["final"].append(run(name))
        report["left"].append([n for n in storage.list_dir(storage.join(runs, name)) if n.startswith("checkpoint-")])
    report["commit"] = commit
    Path(out).write_text(json.dumps(report))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["s3"])  # local: the storage-level test above crashes every local write
def test_a_trainer_resumes_after_a_crash_at_every_step_of_a_save(where, tmp_path, free_ports, request):

    from spatialnet_dist.corpora.synthetic import write_synthetic

    data = str(tmp_path / "shards")
    write_synthetic(data, images=20, seed=0, shard_size=10)
    runs = str(tmp_path / "runs") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/runs"
    out = tmp_path / "report.json"
    spawn_ranks(_resume_after_every_crash, args=(free_ports(1)[0], data, runs, where, str(out)), nprocs=1)
    report = json.loads(out.read_text())
    n, commit = report["points"], report["commit"]
    assert n >= 10  # each of 7+ files put (local: written, renamed), the manifest, pruning
    assert report["resumed_from"] == [1] * (commit + 1) + [2] * (n - commit - 1)
    # Resumed from the step-2 checkpoint: the parameters of the run never crashed. From step 1: the same
    # whatever the crash left (the data order is a function of the position: data/order.py).
    assert report["final"][commit + 1:] == [report["uninterrupted"]] * (n - commit - 1)
    assert len(set(report["final"][:commit + 1])) == 1
    assert report["left"] == [["checkpoint-000002"]] * n  # keep_checkpoints=1, no partial leftover
    print(f"{where}: {n} crash points; resumed from step 1 after {commit + 1}, from step 2 after {n - commit - 1}; "
          "each ended at step 2 with the same parameters as the others resumed from the same step")
