"""The step loop in this process, a world of one (DeepSpeed under gloo): train, save, restore into a new
Trainer, continue. The fast suite's check of what the slow multi-process and Ray runs exercise at scale."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist import config as config_mod
from spatialnet_dist.checkpoint_weights import export_bundle, load_model

STEPS, CHECKPOINT_AT, BATCH = 4, 2, 2
TASKS = ("captioning", "vqa", "classification", "regression")


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory, process_group_of_one):
    """A tiny synthetic corpus, in a process that is a torch.distributed world of one (conftest)."""
    from spatialnet_dist.corpora.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("trainer") / "shards"
    write_synthetic(str(root), images=16, seed=2, shard_size=8)  # seed 2: count questions in every split
    return str(root)


class RecordingReporter:
    """Keeps every report's metrics, and a copy of each checkpoint's files with the weights they hold."""

    def __init__(self, keep_dir: Path):
        self.keep_dir, self.metrics, self.samples = keep_dir, [], []
        self.trainer = None
        self.weights: dict[int, dict] = {}

    def report(self, step: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.metrics.append(metrics)
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.keep_dir / f"step-{step}")
            self.weights[step] = {k: v.detach().clone() for k, v in self.trainer.engine.module.state_dict().items()}

    def report_samples(self, step: int, samples: list[dict]) -> None:
        self.samples.append((step, samples))


def _config(root: str, *overrides: str):
    """The fast loop's config: the tiny corpus at 32 px, loaded in this process, BATCH images per task."""
    return config_mod.load(None, [
        f"data.root={root}", "model.image_size=32", "data.loader_workers=0", "train.cpus_per_worker=1",
        *(f"tasks.{t}.batch_size={BATCH}" for t in TASKS), *overrides])


def _trainer(cfg, vocabs, reporter, validation=None, hooks=()):
    from spatialnet_dist.train.trainer import Trainer

    trainer = Trainer.build(cfg, vocabs, 0, 1, reporter, validation, hooks)
    reporter.trainer = trainer
    return trainer


def test_train_save_restore_continue(world_of_one, tmp_path):
    from spatialnet_dist.data.vocab import build_vocabs

    cfg = _config(world_of_one, f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_AT}",
                  "train.log_every=1", f"eval.every={STEPS}", "eval.val_batches=1", "eval.at_end=false",
                  "optim.warmup_steps=0", "tasks.vqa.questions_per_image=1", "tasks.regression.questions_per_image=1")
    vocabs = build_vocabs(cfg)
    validated, added = [], []

    class Probe:  # the ValidationPass protocol: records what the Trainer hands it
        def __init__(self, model, cfg, vocabs, rank, world_size):
            validated.append(rank)

        def add(self, task, sub):
            added.append(task)

        def finish(self):
            return {"val/probe": 1.0}, [{"image_id": "probe"}]

    first = RecordingReporter(tmp_path)
    trainer = _trainer(cfg, vocabs, first, Probe)
    trainer.save(tmp_path / "before-fit")  # the loader exists from construction: its position saves
    trainer.fit()
    assert [m["step"] for m in first.metrics] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in first.metrics)
    assert added == list(TASKS)  # eval.val_batches=1: each task's one val sub-batch, the one its val loss read
    assert validated == [0] and first.metrics[-1]["val/probe"] == 1.0 and first.samples == [(STEPS, [{"image_id": "probe"}])]
    # Samples are counted once, by the loader's position: the run's count and the rates' come from it.
    assert trainer.samples_seen == dict.fromkeys(TASKS, STEPS * BATCH)
    assert trainer.loader.position()["rows"] == trainer.samples_seen
    assert trainer.questions_seen == {"vqa": STEPS * BATCH, "regression": STEPS * BATCH}
    window = first.metrics[0]
    assert window["samples_per_s"] == pytest.approx(sum(window[f"samples_per_s/{t}"] for t in TASKS))
    assert window["samples_per_s/vqa"] == pytest.approx(window["questions_per_s/vqa"])  # one question per image
    # optim.ema_decay 0: no average; evaluation runs the trained weights themselves
    assert trainer.ema is None and trainer.inference_model() is trainer.engine.module
    assert not (tmp_path / f"step-{STEPS}" / ckpt.EMA_WEIGHTS).exists()

    second = RecordingReporter(tmp_path / "second")
    resumed = _trainer(cfg, vocabs, second)
    assert resumed.restore(tmp_path / f"step-{CHECKPOINT_AT}") == CHECKPOINT_AT
    restored = resumed.engine.module.state_dict()
    assert all(torch.equal(first.weights[CHECKPOINT_AT][k], restored[k]) for k in restored)
    assert resumed.samples_seen == dict.fromkeys(TASKS, CHECKPOINT_AT * BATCH)
    assert resumed.loader.position()["micro_batches"] == CHECKPOINT_AT  # the streams continue from the checkpoint's
    resumed.fit()
    assert [m["step"] for m in second.metrics] == list(range(CHECKPOINT_AT + 1, STEPS + 1))
    assert "val/probe" not in second.metrics[-1] and "val/vqa_loss" in second.metrics[-1]  # no validation given
    assert resumed.samples_seen == trainer.samples_seen
    assert any(not torch.equal(second.weights[STEPS][k], restored_weights) for k, restored_weights in
               first.weights[CHECKPOINT_AT].items())  # it trained on


@pytest.mark.parametrize("kind, error, line", [("nan_loss", "NonFiniteLoss", "^non-finite loss"),
                                               ("user_error", "UserError", "^faults.fail_at_step=2: injected user error$")])
def test_a_non_finite_loss_or_a_user_error_stops_the_loop_with_its_line(world_of_one, tmp_path, kind, error, line):
    """faults.kind=nan_loss at step 2: the Trainer raises NonFiniteLoss before the step's update; user_error: a
    UserError once step 2 is done, before its report. Either ends a Ray run on that attempt with this line
    (tests/test_failures.py; the same through Ray with a full disk: tests/test_train.py); no checkpoint after it."""
    from spatialnet_dist import errors
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.train.faults import fault_hooks
    from spatialnet_dist.train.rundir import RunDir

    cfg = _config(world_of_one, "train.max_steps=3", "train.checkpoint_every=1", "train.log_every=1", "eval.every=0",
                  "eval.at_end=false", "faults.fail_at_step=2", f"faults.kind={kind}")
    reporter = RecordingReporter(tmp_path)
    with pytest.raises(getattr(errors, error), match=line):
        _trainer(cfg, build_vocabs(cfg), reporter, hooks=fault_hooks(cfg, 0, RunDir(str(tmp_path / "run")))).fit()
    assert [m["step"] for m in reporter.metrics] == [1] and sorted(reporter.weights) == [1]


def test_validation_reads_the_val_split_once_for_losses_and_metrics(world_of_one, tmp_path, monkeypatch):
    """The val losses and the task metrics come from one read of each task's val batches: one eval loader per
    task per validation, and metrics equal to those of predicting the whole val split apart. Under
    loss.regularization=l2 (configs/paper.yaml) too: the val losses are the tasks' own, with no weight penalty."""
    from spatialnet_dist.data import batches
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.evaluate.run import ValidationPass, predict_split, score_predictions
    from spatialnet_dist.train import trainer as trainer_mod

    cfg = _config(world_of_one, "train.max_steps=1", "train.checkpoint_every=1", "eval.every=1",
                  "eval.val_batches=1000", "eval.at_end=false", "tasks.vqa.questions_per_image=1",
                  "loss.regularization=l2", "loss.l2=1e-4")
    vocabs = build_vocabs(cfg)
    opened, make = [], batches.make_eval_loader

    def counted(cfg, vocabs, task, split, *args):
        opened.append((task, split))
        return make(cfg, vocabs, task, split, *args)

    monkeypatch.setattr(batches, "make_eval_loader", counted)  # evaluate/run.py's import
    monkeypatch.setattr(trainer_mod, "make_eval_loader", counted)
    reporter = RecordingReporter(tmp_path)
    trainer = _trainer(cfg, vocabs, reporter, ValidationPass)
    trainer.fit()
    assert opened == [(t, "val") for t in TASKS]
    opened.clear()
    scores = score_predictions(predict_split(trainer.inference_model(), cfg, vocabs, "val").rows, cfg, vocabs)
    validated = reporter.metrics[-1]
    for key, value in {"vqa_OA": scores["vqa"]["OA"], "classification_accuracy": scores["classification"]["accuracy"],
                       "regression_MAE": scores["regression"]["MAE"]}.items():
        assert validated[f"val/{key}"] == pytest.approx(value)
    assert {f"val/{t}_loss" for t in TASKS} <= validated.keys()
    assert reporter.samples and "caption" in reporter.samples[0][1][0]  # captioning's sample images, by beam search


def test_the_ema_steps_once_per_optimizer_step_resumes_bit_exact_and_is_what_evaluation_runs(world_of_one, tmp_path):
    """optim.ema_decay with two micro-batches a step: after each optimizer step the checkpoint's EMA is the warm-up
    formula over the weights after each step; restored into a new Trainer it continues bit for bit; a
    weights-only resume starts it at the loaded weights; inference_model, load_model and export carry it."""
    import json

    from safetensors.torch import load_file

    from spatialnet_dist.data.vocab import build_vocabs

    decay = 0.5
    cfg = _config(world_of_one, f"optim.ema_decay={decay}", "optim.grad_accum=2", f"train.max_steps={STEPS}",
                  "train.checkpoint_every=1", f"train.log_every={STEPS}", "eval.every=0", "eval.at_end=false")
    vocabs = build_vocabs(cfg)
    straight = RecordingReporter(tmp_path)
    trainer = _trainer(cfg, vocabs, straight)
    expected = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    buffers = {name for name, _ in trainer.engine.module.named_buffers()}
    trainer.fit()
    for step in range(1, STEPS + 1):
        weight = 1 - min(decay, (1 + step) / (10 + step))  # of the weights after this step
        expected = {k: v if k in buffers else torch.lerp(expected[k], v, weight)
                    for k, v in straight.weights[step].items()}
        saved = load_file(str(tmp_path / f"step-{step}" / ckpt.EMA_WEIGHTS))
        assert saved.keys() == expected.keys()
        for key, value in saved.items():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    raw = trainer.engine.module.state_dict()
    assert any(not torch.equal(trainer.ema.tensors[k], raw[k]) for k in raw)  # the average trails the weights

    resumed = _trainer(cfg, vocabs, RecordingReporter(tmp_path / "resumed"))
    assert resumed.restore(tmp_path / f"step-{CHECKPOINT_AT}") == CHECKPOINT_AT
    resumed.fit()
    assert all(torch.equal(resumed.ema.tensors[k], trainer.ema.tensors[k]) for k in trainer.ema.tensors)
    resumed.restore(tmp_path / f"step-{CHECKPOINT_AT}", weights_only=True)  # fine-tuning from it: a fresh average
    loaded = resumed.engine.module.state_dict()
    assert all(torch.equal(resumed.ema.tensors[k], loaded[k]) for k in loaded)

    evaluated = trainer.inference_model().state_dict()
    assert all(torch.equal(evaluated[k], trainer.ema.tensors[k]) for k in raw)
    url = ckpt.publish(tmp_path / f"step-{STEPS}", str(tmp_path / "run"), STEPS, 0, keep=0)
    listed = json.loads(Path(url, ckpt.MANIFEST).read_text())["files"]
    assert ckpt.EMA_WEIGHTS in listed  # checked against its sha256 like every checkpoint file
    model, _, _ = load_model(url)
    assert all(torch.equal(v, trainer.ema.tensors[k]) for k, v in model.state_dict().items())
    bundle = load_file(str(export_bundle(url, tmp_path / "bundle") / ckpt.BUNDLE_WEIGHTS))
    assert all(torch.equal(v, trainer.ema.tensors[k]) for k, v in bundle.items())


def test_learned_task_balance_trains_reports_and_resumes_with_the_checkpoint(world_of_one, tmp_path):
    """loss.balance=uncertainty: the engine steps the s_t with the network (no weight decay), each report logs
    exp(-s_t) as it stood at the window's step, a checkpoint holds s_t and the optimizer's state of them (the
    resumed run's s_t are the uninterrupted run's, bit for bit), and load_model and a bundle load them strictly."""
    from spatialnet_dist import engine as ds
    from spatialnet_dist import tasks as registry
    from spatialnet_dist.data.vocab import build_vocabs

    tasks = ("classification", "regression")
    cfg = config_mod.load(None, [
        f"data.root={world_of_one}", "model.image_size=32", "data.loader_workers=0", "train.cpus_per_worker=1",
        f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_AT}", "train.log_every=1",
        f"eval.every={STEPS}", "eval.val_batches=1", "eval.at_end=false", "optim.warmup_steps=0", "optim.lr=1e-2",
        "loss.balance=uncertainty", *(f"tasks.{t}.enabled={t in tasks}" for t in registry.names()),
        *(f"tasks.{t}.batch_size={BATCH}" for t in tasks), "tasks.regression.questions_per_image=1"])
    vocabs = build_vocabs(cfg)
    key = "loss_balance.log_variances"
    first = RecordingReporter(tmp_path)
    trainer = _trainer(cfg, vocabs, first)
    assert trainer.engine.module.loss_balance.tasks == list(tasks)
    decay = {id(p): g["weight_decay"] for g in ds.param_groups(trainer.engine.module, 1e-3, 0.05) for p in g["params"]}
    assert decay[id(trainer.engine.module.loss_balance.log_variances)] == 0.0
    trainer.fit()

    # A report's balance/<t> is exp(-s_t) of its step's forward: the s_t after the step before.
    assert [first.metrics[0][f"balance/{t}"] for t in tasks] == [1.0, 1.0]
    s_at = {step: weights[key] for step, weights in first.weights.items()}  # (T,) after steps 2 and 4
    assert not torch.equal(s_at[CHECKPOINT_AT], torch.zeros(2)) and not torch.equal(s_at[STEPS], s_at[CHECKPOINT_AT])
    for i, t in enumerate(tasks):
        assert first.metrics[CHECKPOINT_AT][f"balance/{t}"] == pytest.approx(torch.exp(-s_at[CHECKPOINT_AT][i]).item())
    assert {f"val/{t}_loss" for t in tasks} <= first.metrics[-1].keys()  # validation runs without the balance

    second = RecordingReporter(tmp_path / "second")
    resumed = _trainer(cfg, vocabs, second)
    resumed.restore(tmp_path / f"step-{CHECKPOINT_AT}")
    assert torch.equal(resumed.engine.module.loss_balance.log_variances.detach(), s_at[CHECKPOINT_AT])
    resumed.fit()
    assert torch.equal(second.weights[STEPS][key], s_at[STEPS])  # Adam's moments of s_t came back too

    url = ckpt.publish(tmp_path / f"step-{CHECKPOINT_AT}", str(tmp_path / "run"), CHECKPOINT_AT, rank=0, keep=0)
    model, loaded_cfg, _ = load_model(url)
    assert loaded_cfg.loss.balance == "uncertainty" and torch.equal(model.state_dict()[key], s_at[CHECKPOINT_AT])
    bundle, _, _ = load_model(str(export_bundle(url, tmp_path / "bundle")))
    assert torch.equal(bundle.state_dict()[key], s_at[CHECKPOINT_AT])


@pytest.mark.parametrize("stage", [0, 2])
def test_a_checkpoint_of_any_zero_stage_loads_as_the_weights_it_saved(world_of_one, tmp_path, stage):
    """load_model (eval run, predict, export) consolidates ZeRO-1/2/3 shards through DeepSpeed; ZeRO-0 has none
    (its rank 0 file holds the whole module, which DeepSpeed's consolidation cannot read): both give the weights."""
    from spatialnet_dist.data.vocab import build_vocabs

    cfg = _config(world_of_one, f"train.zero_stage={stage}", "train.max_steps=1", "train.checkpoint_every=1",
                  "eval.every=0", "eval.at_end=false")
    vocabs = build_vocabs(cfg)
    reporter = RecordingReporter(tmp_path)
    _trainer(cfg, vocabs, reporter).fit()
    url = ckpt.publish(tmp_path / "step-1", str(tmp_path / "run"), 1, 0, keep=0)
    model, _, _ = load_model(url)
    assert all(torch.equal(v, reporter.weights[1][k]) for k, v in model.state_dict().items())


def test_a_run_whose_newest_checkpoint_is_damaged_resumes_from_the_one_before_to_the_same_parameters(
        world_of_one, tmp_path, capsys):
    """The torchrun path end to end (train/local.py, a world of one): a run ends at max_steps; its newest checkpoint
    then has a flipped byte; started again, the run passes it over, resumes from the checkpoint before, trains to
    max_steps again and ends with the parameters the run had, the damaged checkpoint kept aside and named."""
    import json

    from spatialnet_dist.train import local
    from spatialnet_dist.train.rundir import DAMAGED_CHECKPOINT, RunDir

    overrides = [f"data.root={world_of_one}", f"run.storage={tmp_path}", "run.name=damaged", "model.image_size=32",
                 "data.loader_workers=0", "train.cpus_per_worker=1", f"train.max_steps={STEPS}",
                 f"train.checkpoint_every={CHECKPOINT_AT}", "run.keep_checkpoints=2", "eval.every=0",
                 "eval.at_end=false", *(f"tasks.{t}.batch_size={BATCH}" for t in TASKS)]
    argv = [arg for item in overrides for arg in ("--set", item)]
    run = RunDir(str(tmp_path / "damaged"))
    newest = run.path(ckpt.checkpoint_name(STEPS))
    assert local.main(argv, None) == 0
    undisturbed = load_model(newest)[0].state_dict()
    model_states = "zero/ds/mp_rank_00_model_states.pt"
    path = Path(newest, model_states)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    capsys.readouterr()

    assert local.main(argv, None) == 0
    out = capsys.readouterr().out.splitlines()
    aside = run.path(f"{ckpt.checkpoint_name(STEPS)}.damaged-1")
    named = [line for line in out[:-1] if model_states in line]  # the log, before the RESULT line
    assert len(named) == 1 and "does not match the sha256" in named[0] and aside in named[0]
    result = json.loads(out[-1].removeprefix("RESULT "))
    assert result["final_step"] == STEPS
    assert result["damaged_checkpoints"] == [{"checkpoint": newest, "file": model_states, "set_aside": aside}]
    assert run.attempts()[-1]["start_step"] == CHECKPOINT_AT and run.attempts()[-1]["lost_steps"] == STEPS - CHECKPOINT_AT
    assert [f["file"] for f in run.failures(DAMAGED_CHECKPOINT)] == [model_states] and run.failures() == []
    resumed = load_model(newest)[0].state_dict()  # the step-4 checkpoint saved anew
    assert resumed.keys() == undisturbed.keys() and all(torch.equal(resumed[k], undisturbed[k]) for k in resumed)
    assert Path(aside, model_states).read_bytes() == bytes(data)  # kept as it was found


# ---- a full disk (issue 30, item 3; tests/test_disk_full.py has the writers one by one) ----


def test_a_full_run_disk_at_a_save_is_named_keeps_the_checkpoint_before_and_the_rerun_resumes_it(
        world_of_one, tmp_path, small_disk):
    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.errors import DiskFull
    from spatialnet_dist.train.local import LocalReporter
    from spatialnet_dist.train.rundir import RunDir

    disk = small_disk.mount("512m")
    run = RunDir(str(disk / "run"))
    ballast = []

    class FillingReporter(LocalReporter):  # the disk fills up once the first checkpoint is in
        def report(self, step, metrics, checkpoint_dir):
            super().report(step, metrics, checkpoint_dir)
            if step == 2:
                ballast.append(small_disk.fill(disk, leave=64 * 1024))

    cfg = _config(world_of_one, "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1", "eval.every=0",
                  "eval.at_end=false")
    vocabs = build_vocabs(cfg)
    with pytest.raises(DiskFull, match=rf"^disk full: no space left writing {disk}/run/checkpoint-000004/\S+ "
                                       r"\(\d+ bytes free of \d+ on its filesystem\)$"):
        _trainer(cfg, vocabs, FillingReporter(run.url, 0, cfg)).fit()
    assert [u for u, _ in ckpt.checkpoints(run.url)] == [run.path("checkpoint-000002")]  # no partial checkpoint-4
    assert [m["step"] for m in RunDir(run.url).metrics()] == [1, 2, 3]
    ballast[0].unlink()
    rerun = _trainer(cfg, vocabs, LocalReporter(run.url, 0, cfg))
    assert ckpt.resume(rerun, run.url)["step"] == 2  # every file of checkpoint-2 verified
    rerun.fit()
    assert ckpt.latest_complete(run.url) == run.path("checkpoint-000004") and rerun.step == 4


def test_a_full_temp_disk_at_a_save_names_the_staging_folder(world_of_one, tmp_path, small_disk, monkeypatch):
    """DeepSpeed's files are staged in TMPDIR first; torch.save raises a RuntimeError there, without an errno."""
    import tempfile

    from spatialnet_dist.data.vocab import build_vocabs
    from spatialnet_dist.errors import DiskFull

    cfg = _config(world_of_one, "train.max_steps=1", "train.checkpoint_every=1", "eval.every=0", "eval.at_end=false")
    reporter = RecordingReporter(tmp_path)
    trainer = _trainer(cfg, build_vocabs(cfg), reporter)
    disk = small_disk.mount("1m", "tmp")
    small_disk.fill(disk, leave=0)
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    with pytest.raises(DiskFull, match=rf"^disk full: no space left writing a checkpoint staged in TMPDIR at "
                                       rf"{disk}/spatialnet-ckpt-\w+ \(\d+ bytes free of 1048576 on its filesystem\)$"):
        trainer.fit()
    assert reporter.metrics == [] and [p.name for p in disk.iterdir() if not p.name.startswith("ballast")] == []
