"""Elastic runs and interruptions: `train.num_workers: [min, max]`, a lost node, a pre-empted worker (SIGTERM).

The slow tests share one Ray cluster of two nodes on 127.0.0.1, a head and a second `ray start --address` node,
one CPU each, so that a 2-worker group has one worker on each node."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from harness import TINY, Job, TwoNodes, sets, when
from test_train import synth_root  # noqa: F401  (a fixture)

from spatialnet_dist import config as config_mod
from spatialnet_dist.config import ConfigError
from spatialnet_dist.tasks import DEFAULT_TASKS
from spatialnet_dist.train import launch, preemption
from spatialnet_dist.train.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]

# ---- config: train.num_workers ----


@pytest.mark.parametrize(("value", "expected"), [("3", (3, 3)), ("[1, 2]", (1, 2)), ("[2, 2]", (2, 2))])
def test_num_workers_is_a_number_or_min_max(value, expected):
    train = config_mod.load(None, [f"train.num_workers={value}"]).train
    assert train.worker_range == expected and train.elastic == value.startswith("[")
    assert config_mod.from_dict(config_mod.load(None, [f"train.num_workers={value}"]).to_dict()).train == train


@pytest.mark.parametrize("value", ["0", "[2, 1]", "[0, 2]", "[1, 2, 3]", "[1.5, 2]", "two", "true"])
def test_bad_num_workers_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"config key train\.num_workers") as e:
        config_mod.load(None, [f"train.num_workers={value}"])
    assert "\n" not in str(e.value)


def test_every_elastic_world_size_must_keep_the_global_batch():
    """[1, 3] workers and a global batch of 4: 3 workers cannot share it; the driver says so before any starts."""
    launch.check_world_sizes(config_mod.load(None, ["train.num_workers=[1, 2]", "tasks.vqa.global_batch_size=4"]))
    cfg = config_mod.load(None, ["train.num_workers=[1, 3]", "tasks.vqa.global_batch_size=4"])
    with pytest.raises(ConfigError, match=r"tasks\.vqa\.global_batch_size: 4 is not a multiple of 3 workers"):
        launch.check_world_sizes(cfg)


# ---- the attempts record: why each restart happened ----


def test_attempts_record_the_cause_of_each_restart(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.record_attempt(0, False, 2)
    run.record_failure(None, "ActorDiedError: a node died")
    run.record_attempt(4, True, 1)  # a failure since the attempt before
    run.end_attempt("preemption", 6)
    run.record_attempt(6, True, 1)
    run.record_attempt(6, True, 2)  # no failure, no pre-emption, another size: an elastic resize
    attempts = run.attempts()
    assert [a["cause"] for a in attempts] == ["start", "failure", "preemption", "resize"]
    assert [a["world_size"] for a in attempts] == [2, 1, 1, 2] and attempts[1]["end_step"] == 6


def test_lost_steps_are_those_of_the_attempt_just_ended(tmp_path):
    """A kill after step 4 before its checkpoint, a restart from 0, a pre-emption checkpointed at step 3: the
    kill lost 4 steps, the pre-emption none (the failure after step 4 was the attempt before's; chaos seed 276)."""
    run = RunDir(str(tmp_path / "run"))
    assert run.start_attempt(0, None, 2) == []
    for step in range(1, 5):
        run.append_metrics({"step": step})
    run.record_failure(4, "ActorDiedError: a worker was killed")
    run.start_attempt(0, None, 2)  # no checkpoint yet: from the start again
    for step in range(1, 4):
        run.append_metrics({"step": step})
    run.end_attempt("preemption", 3)
    resumed = {"checkpoint": "checkpoint-000003", "step": 3, "written_by": 2, "world_size": 2, "resharded": False,
               "samples_seen": {}, "damaged": []}
    assert run.start_attempt(3, resumed, 2)[-1].endswith("; 0 steps lost since")
    assert [(a["cause"], a["lost_steps"]) for a in run.attempts()] == [("start", 0), ("failure", 4), ("preemption", 0)]


# ---- SIGTERM in one process ----


@pytest.fixture
def sigterm_handler(monkeypatch):
    """preemption's handler installed in this process, Ray's side recorded instead of told; restored after."""
    told: list[float] = []
    monkeypatch.setattr(preemption, "_tell_ray", told.append)
    saved = signal.getsignal(signal.SIGTERM)
    preemption._signalled.clear()
    preemption._install(grace_s=30.0)
    yield told
    signal.signal(signal.SIGTERM, saved)
    preemption._signalled.clear()
    preemption._finished.clear()


def test_sigterm_asks_for_a_stop_at_the_next_step_boundary(sigterm_handler):
    check = preemption.StopCheck()
    assert not check.check() and not check.stopped
    t0 = time.time()
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode of this, the main thread
    assert check.check() and check.stopped
    assert len(sigterm_handler) == 1 and t0 + 29 < sigterm_handler[0] < time.time() + 31  # deadline: now + grace
    os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
    assert len(sigterm_handler) == 1


def test_a_process_forked_from_a_worker_still_dies_of_sigterm(sigterm_handler):
    """(A data loader's process takes SIGTERM over as it starts and outlives a pre-emption's: test_resume_data.py.)"""
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, as a process forked from a training worker would be
        os.write(tell, b"1")  # past fork's own signal bookkeeping, which drops a signal that comes earlier
        time.sleep(30)
        os._exit(0)
    os.read(ready, 1)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not sigterm_handler and not preemption._signalled.is_set()


def test_sigterm_after_training_is_over_gets_rays_exit_and_no_checkpoint(sigterm_handler, caplog):
    """Ray shuts a finished group down with SIGTERM: the handler it replaced (Ray's exit) gets it, nothing else."""
    ray_exits = []
    signal.signal(signal.SIGTERM, lambda signum, frame: ray_exits.append(signum))  # as Ray's worker sets it
    preemption._install(grace_s=30.0)
    preemption.training_over()
    os.kill(os.getpid(), signal.SIGTERM)  # the handler, then Ray's, before the next bytecode of this main thread
    assert ray_exits == [signal.SIGTERM]
    assert not sigterm_handler and not preemption._signalled.is_set() and not preemption.StopCheck().check()
    assert "SIGTERM" not in caplog.text


# ---- a 2-node Ray cluster on this machine ----


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, free_ports):
    cluster = TwoNodes(tmp_path_factory.mktemp("cluster"), free_ports)
    try:
        yield cluster
    finally:
        cluster.stop()


def _metrics(runs: Path, name: str) -> list[dict]:
    return RunDir(str(runs / name)).metrics()


def _trained_past_start(runs: Path, name: str, attempts: int, steps: int) -> bool:
    """The run's attempt number `attempts` (from 1) has trained `steps` steps past its start."""
    found = RunDir(str(runs / name)).attempts() if (runs / name).is_dir() else []
    metrics = _metrics(runs, name) if found else []
    return len(found) >= attempts and bool(metrics) and metrics[-1]["step"] >= found[-1]["start_step"] + steps


@pytest.mark.slow
def test_an_elastic_run_through_a_pre_emption_a_lost_node_and_its_return(synth_root, two_nodes, tmp_path, capsys):  # noqa: F811
    """num_workers [1, 2] on two 1-CPU nodes, one worker on each, ZeRO-0 (its checkpoint holds the whole optimizer
    state, loadable on any number of workers), train.max_failures=1. Three interruptions, one after another:

    1. SIGTERM to rank 1 and its loader processes after step 3, at the same instant, as the pre-emption of a whole
       machine sends it: every rank checkpoints at the next step boundary (checkpoint_every is far), and the group
       restarts there on two workers, no step lost, none trained twice.
    2. The second node killed whole: the run resumes from its last checkpoint on the one worker that fits. That it
       goes on at all says the pre-emption was not charged to max_failures=1.
    3. The node returns: within train.elastic_resize_check_s Ray Train's resize restarts the group on two workers
       from the last checkpoint. The run is long (max_steps far away), so that no restart loses a race with its
       end; the driver is stopped once the grown group has trained.

    Throughout, the same global batch per task (its config gives tasks.<t>.global_batch_size; the workers derive
    their share from the size of their group). (SIGTERM to a worker alone, at a random step: tests/test_chaos.py.)"""
    import psutil

    two_nodes.add_second()
    runs, name = tmp_path / "runs", "elastic"
    run = RunDir(str(runs / name))
    signalled: list[int] = []  # how many processes got the SIGTERM
    at: dict[str, float] = {}  # when each interruption came

    def sigterm_rank_1():
        at["sigterm"], at["sigterm_step"] = time.time(), _metrics(runs, name)[-1]["step"]
        worker = psutil.Process(job.pid(1))
        targets = [worker, *worker.children(recursive=True)]
        for process in targets:
            os.kill(process.pid, signal.SIGTERM)
        signalled.append(len(targets))

    def lose_the_second_node():
        at["node_loss"] = time.time()
        two_nodes.second.kill()

    def bring_it_back():
        at["return"] = time.time()
        two_nodes.add_second()

    batches = [f"tasks.{t}.global_batch_size=4" for t in DEFAULT_TASKS]
    job = Job(two_nodes, sets(*TINY, *batches, f"data.root={synth_root}", f"run.storage={runs}", f"run.name={name}",
                              "train.num_workers=[1, 2]", "train.max_steps=100000", "train.checkpoint_every=8",
                              "train.max_failures=1", "train.zero_stage=0", "train.elastic_resize_check_s=2"))
    stepped: dict[int, float] = {}  # attempt -> when it first trained a step past its start
    for attempt in (2, 3, 4):
        when(lambda a=attempt: _trained_past_start(runs, name, a, 1), lambda a=attempt: stepped.setdefault(a, time.time()))
    try:
        steps = [(lambda: len(_metrics(runs, name)) >= 3 and job.pid(1), sigterm_rank_1),
                 (lambda: _trained_past_start(runs, name, 2, 2), lose_the_second_node),
                 (lambda: _trained_past_start(runs, name, 3, 3), bring_it_back),
                 (lambda: _trained_past_start(runs, name, 4, 3), lambda: None)]
        for condition, then in steps:
            when(condition, then).join(timeout=600)
            assert condition(), ("".join(job.lines)[-6000:], run.attempts())
    finally:
        job.proc.kill()
        job.proc.wait(timeout=60)

    attempts = run.attempts()
    assert [(a["cause"], a["world_size"]) for a in attempts] == [
        ("start", 2), ("preemption", 2), ("failure", 1), ("resize", 2)], attempts
    assert signalled[0] > 1  # TINY: data.loader_workers=1
    # The pre-emption's checkpoint is a step boundary soon after the signal (the worker's main thread runs the
    # handler when Ray next polls it, within 2 s), and the restart starts there.
    checkpointed = attempts[0]["end_step"]
    assert at["sigterm_step"] <= checkpointed <= at["sigterm_step"] + 3, attempts
    assert attempts[1]["start_step"] == checkpointed and attempts[1]["lost_steps"] == 0, attempts
    assert all(a["resumed"] for a in attempts[1:]) and attempts[2]["lost_steps"] <= 8, attempts
    metrics = _metrics(runs, name)
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))  # none twice
    for m in metrics:  # images per step over all workers: the global batch, on 2 workers and on 1
        for task in DEFAULT_TASKS:
            assert m[f"samples_per_s/{task}"] * m["step_time_s"] == pytest.approx(4), (task, m)
    with capsys.disabled():  # the figures for bench/RESULTS.md "Resume": seconds from each to the next step trained
        print(f"\nSIGTERM after step {at['sigterm_step']}: 0 steps lost, {stepped[2] - at['sigterm']:.0f} s to the "
              f"next step trained; node lost: {attempts[2]['lost_steps']} steps lost, {stepped[3] - at['node_loss']:.0f} s; "
              f"node back (from its `ray start`): {stepped[4] - at['return']:.0f} s")


# ---- a lost head: the same job on a new cluster ----


def test_a_stale_ray_checkpoint_record_is_dropped_before_ray_starts(tmp_path, monkeypatch):
    """A run directory of a job from before Ray got metrics only: Ray's record names checkpoint-000002, which pruning
    deleted since, and Ray Train would refuse the directory. The driver drops the record before Ray Train reads it;
    the checkpoints stay."""
    import ray.train.torch

    run = tmp_path / "runs" / "old"
    (run / "checkpoint-000004").mkdir(parents=True)
    record = run / launch.RAY_CHECKPOINT_RECORD
    record.write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "checkpoint-000002"}]}))
    seen: list[tuple[bool, str]] = []

    class Trainer:  # what Ray Train's TorchTrainer is handed, at the moment it would read its record
        def __init__(self, train_loop, run_config, **kwargs):
            seen.append((record.exists(), run_config.name))

        def fit(self):
            return "result"

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    cfg = config_mod.load(None, [f"run.storage={tmp_path / 'runs'}", "run.name=old"])
    assert launch.run_training(cfg, {}, str(run), print) == "result"
    assert seen == [(False, "old")] and (run / "checkpoint-000004").is_dir()


@pytest.mark.slow
def test_the_same_job_on_a_new_head_resumes_a_run_whose_head_was_lost(synth_root, two_nodes, tmp_path, free_ports):  # noqa: F811
    """A one-node cluster of the test's own is killed whole (head, raylet, workers) and the job's driver with it,
    once checkpoint 6 of 12 is complete and checkpoint 2 pruned (run.keep_checkpoints=2). The run directory
    says "running" with no driver; the same command on a new head resumes from checkpoint 6 (Ray's run snapshot
    names no checkpoint that pruning deleted: Ray registers none) and trains steps 7-12 once each. (That a resume
    ends with the parameters of a run never disturbed: tests/test_chaos.py, tests/test_resume_data.py.)"""
    runs = tmp_path / "runs"
    args = [*TINY, f"data.root={synth_root}", f"run.storage={runs}", "train.num_workers=1", "train.max_steps=12",
            "train.checkpoint_every=2", "run.keep_checkpoints=2"]
    run = RunDir(str(runs / "lost"))
    (tmp_path / "old").mkdir()
    old = TwoNodes(tmp_path / "old", free_ports)
    try:
        job = Job(old, sets(*args, "run.name=lost"))

        def lose_the_head():
            old.head.kill()
            job.proc.kill()  # the driver runs on the head (`ray job submit`): it goes with it

        when(lambda: (runs / "lost" / "checkpoint-000006" / "manifest.json").is_file()
              and not (runs / "lost" / "checkpoint-000002").exists(), lose_the_head).join(600)
        job.proc.wait(timeout=60)
    finally:
        old.stop()
    assert job.proc.returncode is not None and not (runs / "lost" / "checkpoint-000002").exists()
    assert not (runs / "lost" / launch.RAY_CHECKPOINT_RECORD).exists()
    assert run.describe()["state"] == "running" and run.result() is None  # no driver left to write result.json

    code, result = Job(two_nodes, sets(*args, "run.name=lost")).result()  # the module's cluster: another head
    assert code == 0, result
    assert result["final_step"] == 12 and result["resumed_from"] == [6], result
    assert result["checkpoint"].endswith("checkpoint-000012") and run.describe()["state"] == "finished"
    assert [m["step"] for m in _metrics(runs, "lost")] == list(range(1, 13))  # none twice
