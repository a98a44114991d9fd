"""Elastic runs and interruptions: `train.num_workers: [min, max]`, a lost node, a pre-empted worker (SIGTERM).

The slow tests share one Ray cluster of two nodes on 127.0.0.1, a head and a second `ray start --address` node,
one CPU each, so that a 2-worker group has one worker on each node."""

from __future__ import annotations

import json
import os
import signal
import threading
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


def _restarted_and_stepped(runs: Path, name: str, at: list[float]) -> threading.Thread:
    """Appends to `at` the time the run's second attempt first trains a step (bench/RESULTS.md "Resume": seconds
    from a failure to the next training step)."""
    def stepped() -> bool:
        attempts = RunDir(str(runs / name)).attempts() if (runs / name).is_dir() else []
        return len(attempts) >= 2 and any(m["step"] > attempts[-1]["start_step"] for m in _metrics(runs, name))

    return when(stepped, lambda: at.append(time.time()))


@pytest.mark.slow
def test_sigterm_to_a_worker_and_its_loaders_checkpoints_and_resumes_losing_no_step(synth_root, two_nodes, tmp_path, capsys):  # noqa: F811
    """SIGTERM to rank 1 and its loader processes after step 3, at the same instant, as the pre-emption of a whole
    machine sends it: every rank checkpoints at the next step boundary, the group restarts from that checkpoint
    (not from step 0: no periodic checkpoint before max_steps), and max_failures=0 allows it. (SIGTERM to the
    worker alone, at a random step: tests/test_chaos.py.)"""
    import psutil

    two_nodes.add_second()
    runs = tmp_path / "runs"
    signalled: list[int] = []
    processes: list[int] = []  # how many processes were signalled
    job = Job(two_nodes, sets(*TINY, f"data.root={synth_root}", f"run.storage={runs}", "run.name=pre",
                              "train.num_workers=2", "train.max_steps=8", "train.checkpoint_every=100",
                              "train.max_failures=0", "train.zero_stage=2"))

    def sigterm_rank_1():
        signalled.append(_metrics(runs, "pre")[-1]["step"])
        signalled_at.append(time.time())
        worker = psutil.Process(job.pid(1))
        targets = [worker, *worker.children(recursive=True)]
        for process in targets:
            os.kill(process.pid, signal.SIGTERM)
        processes.append(len(targets))

    signalled_at: list[float] = []
    stepped_at: list[float] = []
    when(lambda: len(_metrics(runs, "pre")) >= 3 and job.pid(1), sigterm_rank_1)
    _restarted_and_stepped(runs, "pre", stepped_at)
    code, result = job.result()
    assert signalled and code == 0, result
    assert len(processes) == 1 and processes[0] > 1  # TINY: data.loader_workers=1
    attempts = RunDir(result["run_dir"]).attempts()
    assert result["final_step"] == 8 and result["restart_causes"] == ["preemption"], result
    # The checkpoint is a step boundary soon after the signal (the worker's main thread runs the handler when Ray
    # next polls it, within 2 s), and the restart starts there: no step lost, none trained twice.
    checkpointed = attempts[0]["end_step"]
    assert signalled[0] <= checkpointed <= signalled[0] + 3 and result["resumed_from"] == [checkpointed]
    assert [m["step"] for m in _metrics(runs, "pre")] == list(range(1, 9))
    assert RunDir(result["run_dir"]).failures() == [] and result["lost_steps"] == [0]
    with capsys.disabled():  # the figure for bench/RESULTS.md "Resume"
        print(f"\nSIGTERM after step {signalled[0]}: {result['lost_steps']} steps lost, "
              f"{stepped_at[0] - signalled_at[0]:.0f} s from the signal to the next training step")


@pytest.mark.slow
def test_a_lost_node_leaves_an_elastic_run_on_one_worker(synth_root, two_nodes, tmp_path, capsys):  # noqa: F811
    """num_workers [1, 2] on two 1-CPU nodes: the second node is killed whole after checkpoint 2; the run resumes
    from it on the one worker that fits and finishes, with the same global batch per task (its config gives
    tasks.<t>.global_batch_size; the workers derive their share from the size of their group). ZeRO-0: its
    checkpoint holds the whole optimizer state, loadable on any number of workers."""
    two_nodes.add_second()
    runs = tmp_path / "runs"
    killed: list[int] = []

    def kill_second_node():
        killed.append(_metrics(runs, "elastic")[-1]["step"])
        killed_at.append(time.time())
        two_nodes.second.kill()

    killed_at: list[float] = []
    stepped_at: list[float] = []
    when(lambda: (runs / "elastic" / "checkpoint-000002" / "manifest.json").is_file(), kill_second_node)
    _restarted_and_stepped(runs, "elastic", stepped_at)
    batches = [f"tasks.{t}.global_batch_size=4" for t in DEFAULT_TASKS]
    code, result = Job(two_nodes, sets(*TINY, *batches, f"data.root={synth_root}", f"run.storage={runs}",
                                       "run.name=elastic", "train.num_workers=[1, 2]", "train.max_steps=6",
                                       "train.checkpoint_every=2", "train.max_failures=1",
                                       "train.zero_stage=0")).result()
    assert killed and code == 0, result
    assert result["final_step"] == 6 and result["world_sizes"] == [2, 1], result
    assert result["restart_causes"] == ["failure"] and result["resumed_from"] in ([2], [4]), result
    metrics = _metrics(runs, "elastic")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    for m in metrics:  # images per step over all workers: the global batch, on 2 workers and on 1
        for task in DEFAULT_TASKS:
            assert m[f"samples_per_s/{task}"] * m["step_time_s"] == pytest.approx(4), (task, m)
    with capsys.disabled():  # the figure for bench/RESULTS.md "Resume"
        print(f"\nnode lost after step {killed[0]}: {result['lost_steps']} steps lost, "
              f"{stepped_at[0] - killed_at[0]:.0f} s from the loss to the next training step")


@pytest.mark.slow
def test_an_elastic_run_grows_back_when_a_node_returns(synth_root, two_nodes, tmp_path):  # noqa: F811
    """num_workers [1, 2] with one 1-CPU node up (the previous test killed the second): the run starts on one
    worker; a node joins; within train.elastic_resize_check_s Ray Train's resize restarts the group on two
    workers from the last checkpoint, each now taking half of the same global batch per task. The run is long
    (max_steps far away) so that the node's start cannot lose a race with its end; the driver is stopped once
    the two-worker group has trained."""
    if two_nodes.second is not None and two_nodes.second.proc.poll() is None:
        two_nodes.second.kill()
        two_nodes.wait_for_nodes(1)
    runs = tmp_path / "runs"
    run = RunDir(str(runs / "grow"))
    batches = [f"tasks.{t}.global_batch_size=4" for t in DEFAULT_TASKS]
    job = Job(two_nodes, sets(*TINY, *batches, f"data.root={synth_root}", f"run.storage={runs}", "run.name=grow",
                              "train.num_workers=[1, 2]", "train.max_steps=100000", "train.checkpoint_every=2",
                              "train.elastic_resize_check_s=2", "train.zero_stage=0"))
    try:
        when(lambda: len(_metrics(runs, "grow")) >= 3, two_nodes.add_second).join(timeout=600)

        def grown() -> bool:
            attempts = run.attempts() if (runs / "grow").is_dir() else []
            return (len(attempts) >= 2 and attempts[-1]["world_size"] == 2
                    and _metrics(runs, "grow")[-1]["step"] >= attempts[-1]["start_step"] + 3)

        when(grown, lambda: None).join(timeout=600)
        assert grown(), "".join(job.lines)[-6000:]
    finally:
        job.proc.kill()
        job.proc.wait(timeout=60)
    attempts = run.attempts()
    assert [a["world_size"] for a in attempts] == [1, 2] and attempts[1]["cause"] == "resize", attempts
    assert attempts[1]["resumed"] and attempts[1]["start_step"] >= 2, attempts
    metrics = _metrics(runs, "grow")
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    for m in metrics:  # images per step over all workers: the global batch, on 1 worker and on 2
        for task in DEFAULT_TASKS:
            assert m[f"samples_per_s/{task}"] * m["step_time_s"] == pytest.approx(4), (task, m)


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
def test_the_same_job_on_a_new_head_resumes_a_run_whose_head_was_lost(synth_root, tmp_path, free_ports):  # noqa: F811
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
    (tmp_path / "new").mkdir()
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

    new = TwoNodes(tmp_path / "new", free_ports)
    try:
        code, result = Job(new, sets(*args, "run.name=lost")).result()
        assert code == 0, result
    finally:
        new.stop()
    assert result["final_step"] == 12 and result["resumed_from"] == [6], result
    assert result["checkpoint"].endswith("checkpoint-000012") and run.describe()["state"] == "finished"
    assert [m["step"] for m in _metrics(runs, "lost")] == list(range(1, 13))  # none twice
