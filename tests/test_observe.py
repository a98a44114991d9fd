"""Runs where people look: TensorBoard event files and MLflow runs, read back with TensorBoard's own reader
and MLflow's client; `spatialnet runs list/show` on local and S3 run directories; a command line that
explains itself (help on every option, --version, JSON alone on stdout)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import as_torchrun_worker, spawn_ranks

from spatialnet_dist import config as config_mod
from spatialnet_dist import jobs
from spatialnet_dist.cli import build_parser
from spatialnet_dist.cli import main as cli_main
from spatialnet_dist.store import storage
from spatialnet_dist.train import launch
from spatialnet_dist.train.rundir import MLFLOW_RUN_FILE, TENSORBOARD_DIR, RunDir
from spatialnet_dist.train.tracking import RunTracker

REPO = Path(__file__).resolve().parents[1]


def events(folder: str | Path):
    """TensorBoard's own reader over every event file of a folder (as `tensorboard --logdir` reads it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar_steps(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def text_of(acc, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def sample(image_id: str, caption: str) -> dict:
    image = np.random.default_rng(0).normal(size=(16, 16, 3)).astype(np.float32)  # (H, W, C), normalised
    return {"image": image, "image_id": image_id, "caption": caption, "references": ["a field"],
            "qa": [{"question": "is there water?", "answer": "no", "prediction": "yes"}]}


# ---- TensorBoard and MLflow, written by RunTracker ----


def test_tensorboard_gets_every_metric_and_samples_and_a_resume_replaces_the_repeated_steps(tmp_path):
    cfg = config_mod.load(None, [f"run.storage={tmp_path}"])
    run = RunDir(str(tmp_path / "demo"))
    first = RunTracker(cfg, run, start_step=0)
    for step in (1, 2, 3):
        first.log_metrics(step, {"step": step, "loss": 10.0 + step, "samples_per_s/vqa": 5.0, "val/vqa_OA": 0.5})
    first.log_samples(2, [sample("img-1", "a green field")])
    # The attempt dies after step 3; the next resumes from the step-2 checkpoint and reports step 3 again.
    second = RunTracker(cfg, run, start_step=2)
    second.log_metrics(3, {"step": 3, "loss": 1.0})
    second.log_evaluation({"vqa": {"OA": 0.75, "per_type": {"count": 0.5}, "OA_ci": [0.7, 0.8]}},
                          [sample("img-2", "two houses")], tmp_path, "test")
    second.close()

    acc = events(tmp_path / "demo" / TENSORBOARD_DIR)
    assert scalar_steps(acc, "loss") == {1: 11.0, 2: 12.0, 3: 1.0}
    assert scalar_steps(acc, "samples_per_s/vqa") == {1: 5.0, 2: 5.0}  # step 3's purged with the old attempt
    assert scalar_steps(acc, "test/vqa/OA") == {3: 0.75}
    assert scalar_steps(acc, "test/vqa/per_type/count") == {3: 0.5}
    assert "step" not in acc.Tags()["scalars"] and "test/vqa/OA_ci" not in acc.Tags()["scalars"]
    assert [e.step for e in acc.Images("val_samples/0")] == [2]
    assert acc.Images("test_samples/0")[0].width == 16
    assert "a green field" in text_of(acc, "val_samples/0") and "is there water?" in text_of(acc, "val_samples/0")
    assert "two houses" in text_of(acc, "test_samples/0")


def test_tensorboard_on_s3_is_uploaded(s3_bucket, tmp_path):
    cfg = config_mod.load(None, [f"run.storage=s3://{s3_bucket}/runs"])
    run = RunDir(f"s3://{s3_bucket}/runs/demo")
    tracker = RunTracker(cfg, run, start_step=0)
    tracker.log_metrics(1, {"step": 1, "loss": 2.5})
    names = storage.list_dir(run.path(TENSORBOARD_DIR))  # there while the run goes on, not only at its end
    assert len(names) == 1
    tracker.close()
    local = tmp_path / "tb"
    local.mkdir()
    (local / names[0]).write_bytes(storage.read_bytes(run.path(TENSORBOARD_DIR, names[0])))
    assert scalar_steps(events(local), "loss") == {1: 2.5}


def test_mlflow_run_has_the_config_metrics_and_report(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config_mod.load(None, [f"run.storage={tmp_path}", "log.mlflow=true", "train.max_steps=7"])
    run = RunDir(str(tmp_path / "demo"))
    tracker = RunTracker(cfg, run, start_step=0)
    tracker.log_metrics(1, {"step": 1, "loss": 3.0, "val/vqa_OA": 0.25})
    report = tmp_path / "eval"
    report.mkdir()
    (report / "report.md").write_text("# report")
    (report / "losses.png").write_bytes(b"png")
    resumed = RunTracker(cfg, run, start_step=1)  # a later attempt logs to the same MLflow run
    resumed.log_metrics(2, {"step": 2, "loss": 2.0})
    scores = {"accuracy": 0.5, "per_class": {"court (clay)": 1.0, "empty": None}}  # a name MLflow refuses as is
    resumed.log_evaluation({"classification": scores}, [], report, "test")
    resumed.close()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default store: beside the runs of run.storage
    known = json.loads((tmp_path / "demo" / MLFLOW_RUN_FILE).read_text())
    assert known["tracking_uri"] == uri
    client = MlflowClient(uri)
    found = client.get_run(known["run_id"])
    assert found.info.run_name == "demo" and found.info.status == "FINISHED"
    assert found.data.params["train.max_steps"] == "7" and found.data.params["log.mlflow"] == "True"
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss")] == [(1, 3.0), (2, 2.0)]
    assert found.data.metrics["val/vqa_OA"] == 0.25 and found.data.metrics["test/classification/accuracy"] == 0.5
    assert found.data.metrics["test/classification/per_class/court _clay_"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id, "eval")}
    assert {"eval/report.md", "eval/losses.png"} <= artifacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(found.info.run_id)}


def test_mlflow_off_imports_nothing_of_it(tmp_path):
    # DeepSpeed itself tries `import mlflow` (deepspeed/autotuning) when it is installed: this checks ours.
    code = f"""
import sys
import numpy as np
from spatialnet_dist import cli, config
from spatialnet_dist.evaluate import run
from spatialnet_dist.train.rundir import RunDir
from spatialnet_dist.train.tracking import RunTracker
cfg = config.load(None, ["run.storage={tmp_path}"])
tracker = RunTracker(cfg, RunDir("{tmp_path}/demo"), 0)
tracker.log_metrics(1, {{"step": 1, "loss": 1.0}})
tracker.log_samples(1, [{{"image": np.zeros((8, 8, 3), np.uint8), "image_id": "a", "caption": "x"}}])
tracker.close()
print(sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_mlflow_on_s3_storage_needs_a_tracking_server(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert jobs.train_with_ray(["--set", "run.storage=s3://bucket/runs", "--set", "log.mlflow=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MLFLOW_TRACKING_URI" in err and "log.mlflow" in err


# ---- a short training run: what it leaves where people look ----


def _train_worker(rank: int, port: int, root: str, storage_dir: str):
    """3 steps on one rank (DeepSpeed under gloo), validation at step 2, then the end-of-run evaluation
    as the Ray worker runs it (without captions: their scorers are java)."""
    as_torchrun_worker(0, 1, port)
    from test_train import TINY

    from spatialnet_dist import engine as ds
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.evaluate.run import ValidationPass, evaluate_model
    from spatialnet_dist.train.local import train

    cfg = config_mod.load(None, [*TINY, f"data.root={root}", f"run.storage={storage_dir}", "train.max_steps=3",
                                 "train.checkpoint_every=3", "eval.every=2", "eval.val_batches=1", "eval.beam_size=1",
                                 "log.mlflow=true", "train.cpus_per_worker=1"])
    ds.init_distributed(False)
    vocabs = build_vocabs(cfg)
    run = RunDir(str(Path(storage_dir) / cfg.run.name))
    trainer = train(cfg, vocabs, run.url, rank, 1, ValidationPass)
    eval_cfg = config_mod.from_dict(cfg.to_dict())
    eval_cfg.tasks.captioning.enabled = False
    eval_cfg.eval.max_samples = 4
    tracker = RunTracker(cfg, run, trainer.step)
    evaluate_model(trainer.inference_model(), eval_cfg, vocabs, "test", 0, 1, out_dir=run.path("eval"),
                   metrics_jsonl=run.path("metrics.jsonl"), tracker=tracker)
    tracker.close()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, free_ports):

    from spatialnet_dist.corpora.synthetic import write_synthetic

    base = tmp_path_factory.mktemp("observe")
    root, storage_dir = str(base / "shards"), str(base / "runs")
    write_synthetic(root, images=40, seed=0, shard_size=10)
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        spawn_ranks(_train_worker, args=(free_ports(1)[0], root, storage_dir), nprocs=1)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return {"shards": root, "storage": storage_dir, "run": Path(storage_dir) / "demo"}


@pytest.mark.slow
def test_training_run_in_tensorboard(trained_run):
    run = trained_run["run"]
    acc = events(run / TENSORBOARD_DIR)
    records = RunDir(str(run)).metrics()
    assert [r["step"] for r in records] == [1, 2, 3]
    keys = {k for r in records for k in r if k != "step"}
    assert "val/vqa_OA" in keys and "samples_per_s/captioning" in keys
    for key in keys:  # every scalar of metrics.jsonl, at its steps, with its values (float32 in the file)
        assert scalar_steps(acc, key) == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in records if key in r}
    assert "test/vqa/OA" in acc.Tags()["scalars"] and "test/classification/accuracy" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Images("val_samples/0")] == [2]
    assert "Generated caption" in text_of(acc, "val_samples/0")  # captioned by beam search at validation
    assert "| question" in text_of(acc, "test_samples/0")  # the test images' questions and answers


@pytest.mark.slow
def test_training_run_in_mlflow(trained_run):
    from mlflow import MlflowClient

    known = json.loads((trained_run["run"] / MLFLOW_RUN_FILE).read_text())
    client = MlflowClient(known["tracking_uri"])
    found = client.get_run(known["run_id"])
    assert found.info.status == "FINISHED" and found.data.params["train.max_steps"] == "3"
    assert [m.step for m in client.get_metric_history(known["run_id"], "loss")] == [1, 2, 3]
    assert "val/vqa_OA" in found.data.metrics and "test/vqa/OA" in found.data.metrics
    artifacts = {a.path for a in client.list_artifacts(known["run_id"], "eval")}
    assert {"eval/report.md", "eval/metrics.json", "eval/losses.png", "eval/predictions"} <= artifacts


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """The command line in its own process: stdout as a pipe, as `| jq` sees it."""
    return subprocess.run([sys.executable, "-m", "spatialnet_dist.cli", *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})


@pytest.mark.slow
def test_json_output_is_alone_on_stdout(trained_run, tmp_path):
    from PIL import Image

    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    checkpoint = str(trained_run["run"] / "checkpoint-000003")
    predicted = _cli("predict", checkpoint, str(image), "--question", "is there water?", "--json")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert json.loads(predicted.stdout)[0]["answers"][0]["question"] == "is there water?"
    assert "Processing zero checkpoint" in predicted.stderr  # DeepSpeed's lines: still shown, on stderr
    inspected = _cli("shards", "inspect", trained_run["shards"], "--json")
    assert inspected.returncode == 0 and "synthetic" in json.dumps(json.loads(inspected.stdout))
    vqa = str(trained_run["run"] / "eval" / "predictions" / "vqa.json")
    scored = _cli("eval", "vqa", "--pred", vqa, "--json")
    assert scored.returncode == 0 and set(json.loads(scored.stdout)) >= {"AA", "OA", "per_type"}


# ---- spatialnet runs list / show ----


def _make_run(root: str, name: str, steps: int, error: str | None = None, finished: bool = True) -> RunDir:
    cfg = config_mod.load(None, [f"run.name={name}", "train.max_steps=4"])
    run = RunDir(storage.join(root, name))
    run.write_config(cfg)
    if steps == 0:
        return run
    run.record_attempt(0, False, 1)
    for step in range(1, steps + 1):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    storage.write_bytes_atomic(run.path(f"checkpoint-{steps:06d}", "meta.json"), b"{}")
    storage.write_bytes_atomic(run.path("checkpoint_tmp_abc", "x"), b"")  # Ray's staging: not a checkpoint
    if finished:
        storage.write_bytes_atomic(run.path("eval", "report.md"), b"# report")
        run.write_result({"final_step": steps, "error": error})
    return run


@pytest.mark.parametrize("where", ["local", "s3"])
def test_runs_list_and_show(where, tmp_path, request, capsys):
    root = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/runs"
    _make_run(root, "done", 4)
    _make_run(root, "broken", 2, error="non-finite loss")
    _make_run(root, "going", 3, finished=False)
    _make_run(root, "new", 0)
    assert cli_main(["runs", "list", root, "--json"]) == 0
    runs = {r["run_dir"].rsplit("/", 1)[-1]: r for r in json.loads(capsys.readouterr().out)}
    assert {n: r["state"] for n, r in runs.items()} == {
        "done": "finished", "broken": "failed", "going": "running", "new": "created"}
    assert runs["broken"]["error"] == "non-finite loss"
    assert cli_main(["runs", "list", root]) == 0
    table = capsys.readouterr().out
    assert "| done " in table and "4/4" in table and "failed" in table

    assert cli_main(["runs", "show", storage.join(root, "done"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["last_step"] == 4 and shown["max_steps"] == 4 and shown["last_metrics"] == {"step": 4, "loss": 0.25}
    assert shown["checkpoints"] == [storage.join(root, "done", "checkpoint-000004")]
    assert shown["report"] == storage.join(root, "done", "eval", "report.md")
    assert cli_main(["runs", "show", storage.join(root, "going")]) == 0
    text = capsys.readouterr().out
    assert "state:       running" in text and "step:        3 of 4" in text and "loss = 0.333333" in text
    assert cli_main(["runs", "show", storage.join(root, "nothing-here")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing-here" in err


# ---- a command line that explains itself ----


def _walk(parser: argparse.ArgumentParser, path: str = ""):
    """(command path, action) for every argument and subcommand of a parser tree."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", argparse.Action([name], name, help=helped.get(name))
                yield from _walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_and_command_has_help():
    missing = [f"spatialnet{path}: {'/'.join(action.option_strings) or action.dest}"
               for parser, prefix in ((build_parser(), ""), (launch.build_parser(), " train"))
               for path, action in _walk(parser, prefix) if not action.help]
    assert not missing, missing


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"spatialnet {importlib.metadata.version('spatialnet-dist')}"
