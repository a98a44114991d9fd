"""Driver-side preflight (train.preflight): one check per function, each refusing with one line that names
the key or file, before any worker starts; and the driver stopping on it without starting Ray."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from spatialnet_dist import config as config_mod
from spatialnet_dist import jobs
from spatialnet_dist import tasks as registry
from spatialnet_dist.errors import UserError
from spatialnet_dist.train import launch, preflight


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> str:
    from spatialnet_dist.corpora.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("store") / "shards"
    write_synthetic(str(root), images=20, seed=0, shard_size=10)
    return str(root)


def cfg_with(*overrides: str) -> config_mod.Config:
    return config_mod.load(None, list(overrides))


def refusal(check, *args) -> str:
    with pytest.raises(UserError) as raised:
        check(*args)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_splits_read_follow_the_config():
    assert preflight.splits_read(cfg_with("eval.every=0", "eval.at_end=false")) == ["train"]
    assert preflight.splits_read(cfg_with("eval.every=5", "eval.split=test")) == ["train", "val", "test"]
    assert preflight.splits_read(cfg_with("eval.every=0", "eval.split=val")) == ["train", "val"]


def test_manifests_pass_for_a_complete_corpus(synth_root):
    preflight.check_manifests(cfg_with(f"data.root={synth_root}", "eval.every=5"))


def test_a_missing_corpus_is_named(synth_root):
    message = refusal(preflight.check_manifests, cfg_with(f"data.root={synth_root}", "tasks.vqa.corpora=[rsvqa-lr]"))
    assert "tasks.vqa.corpora" in message and "rsvqa-lr" in message and "convert" in message


def test_an_eval_split_typo_is_named_before_training(synth_root):
    message = refusal(preflight.check_manifests, cfg_with(f"data.root={synth_root}", "eval.split=tset"))
    assert "'tset'" in message and "manifest.json" in message


def test_a_missing_shard_file_is_named(synth_root, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(synth_root, root)
    victim = sorted((root / "synthetic" / "val").iterdir())[0]
    victim.unlink()
    message = refusal(preflight.check_manifests, cfg_with(f"data.root={root}", "eval.every=5"))
    assert victim.name in message and "missing" in message
    preflight.check_manifests(cfg_with(f"data.root={root}", "eval.every=0", "eval.split=test"))  # val unread


def test_resume_must_be_a_checkpoint(tmp_path):
    message = refusal(preflight.check_sources, cfg_with(f"train.resume={tmp_path}"))
    assert message.startswith("train.resume:") and "meta.json" in message
    (tmp_path / "meta.json").write_text("{}")
    preflight.check_sources(cfg_with(f"train.resume={tmp_path}"))


def test_pretrained_must_be_a_weights_file(tmp_path):
    assert "no such local file" in refusal(preflight.check_sources, cfg_with(f"model.pretrained={tmp_path}/vit.pth"))
    (tmp_path / "vit.txt").write_text("")
    assert ".safetensors" in refusal(preflight.check_sources, cfg_with(f"model.pretrained={tmp_path}/vit.txt"))
    (tmp_path / "vit.pth").write_bytes(b"")
    preflight.check_sources(cfg_with(f"model.pretrained={tmp_path}/vit.pth"))
    preflight.check_sources(cfg_with("model.pretrained=hub"))


def test_run_storage_must_be_writable(tmp_path):
    preflight.check_run_storage(str(tmp_path / "runs" / "demo"))
    assert os.listdir(tmp_path / "runs" / "demo") == []  # the probe is gone
    (tmp_path / "file").write_text("")  # a folder cannot be made under a file, root or not
    message = refusal(preflight.check_run_storage, str(tmp_path / "file" / "demo"))
    assert message.startswith("run.storage:") and "file/demo" in message


def test_java_is_needed_only_when_captions_are_scored(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "java" in refusal(preflight.check_java, cfg_with("eval.at_end=true"))
    preflight.check_java(cfg_with("eval.at_end=false"))
    preflight.check_java(cfg_with("tasks.captioning.enabled=false"))


def test_launch_stops_on_preflight_before_ray_starts(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launch, "connect_ray", lambda cfg: pytest.fail("Ray started despite a failed preflight"))
    t0 = time.time()
    code = jobs.train_with_ray(["--set", f"data.root={synth_root}", "--set", f"run.storage={tmp_path}",
                        "--set", "eval.split=tset"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'tset'" in err[0]
    assert time.time() - t0 < 30


def test_the_torchrun_path_runs_the_same_preflight(tmp_path, capsys):
    # The demo config's other tasks off (else the demo's synthetic corpus is made before the check fails).
    only_vqa = [f"tasks.{t}.enabled=false" for t in registry.names() if t != "vqa"]
    code = jobs.train_with_torchrun([arg for item in (*only_vqa, f"data.root={tmp_path}", "tasks.vqa.corpora=[rsvqa-lr]",
                                        f"run.storage={tmp_path}/runs") for arg in ("--set", item)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "rsvqa-lr" in err[0] and "convert" in err[0]
