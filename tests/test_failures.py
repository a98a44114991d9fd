"""Failure classes (train.failures), decided as Ray Train's controller decides them, without a cluster:
permanent errors end the run, the same step failing twice ends it, a killed process is left to Ray."""

from __future__ import annotations

import pytest
from ray import cloudpickle
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError

from spatialnet_dist.errors import NonFiniteLoss, UserError
from spatialnet_dist.train import failures
from spatialnet_dist.train.failures import FailureClassifier, PermanentFailure
from spatialnet_dist.train.rundir import RunDir


def marked(error: Exception, step: int) -> Exception:
    failures.mark_step(error, step)
    return cloudpickle.loads(cloudpickle.dumps(error))  # as Ray hands it to the controller


@pytest.mark.parametrize("error", [UserError("shard s3://b/x.tar: not a tar file"),
                                   NonFiniteLoss("non-finite loss between steps 3 and 3")])
def test_a_permanent_error_ends_the_run_at_once_with_its_line(tmp_path, error):
    classifier = FailureClassifier(str(tmp_path))
    # Rank 1 fails in a collective because rank 0 left: rank 0's reason is the one that explains it.
    with pytest.raises(PermanentFailure) as raised:
        classifier.after_exception(None, {0: RuntimeError("gloo: connection closed"), 1: marked(error, 3)})
    assert str(raised.value) == str(error)
    assert RunDir(str(tmp_path)).failures()[-1]["step"] == 3


def test_the_same_step_failing_twice_ends_the_run(tmp_path):
    classifier = FailureClassifier(str(tmp_path))
    classifier.after_exception(None, {0: marked(RuntimeError("boom"), 7)})  # first time: Ray retries
    classifier.after_exception(None, {0: marked(RuntimeError("boom"), 9)})  # another step: retried too
    with pytest.raises(PermanentFailure, match="failed twice in a row after step 9: RuntimeError: boom"):
        classifier.after_exception(None, {0: marked(RuntimeError("boom"), 9), 1: marked(OSError("reset"), 9)})
    assert [f["step"] for f in RunDir(str(tmp_path)).failures()] == [7, 9, 9]


def test_a_damaged_checkpoint_between_two_failures_of_a_step_is_no_failure_of_a_group(tmp_path):
    """failures.json also records the damaged checkpoints a resume passed over (class damaged_checkpoint) and the
    pre-emptions (class preemption): the step failing twice, the restart causes and the lost steps go by the failed
    worker groups alone."""
    from spatialnet_dist.train.rundir import DAMAGED_CHECKPOINT, PREEMPTION

    run, classifier = RunDir(str(tmp_path)), FailureClassifier(str(tmp_path))
    run.record_attempt(0, False, 2)
    classifier.after_exception(None, {0: marked(RuntimeError("boom"), 9)})
    run.record_failure(None, "checkpoint c: meta.json is missing", DAMAGED_CHECKPOINT, checkpoint="c", file="meta.json")
    with pytest.raises(PermanentFailure, match="failed twice in a row after step 9"):
        classifier.after_exception(None, {0: marked(RuntimeError("boom"), 9)})
    assert [f["class"] for f in run.failures()] == ["worker_group"] * 2
    assert [f["file"] for f in run.failures(DAMAGED_CHECKPOINT)] == ["meta.json"]
    run.end_attempt("preemption", 9)
    run.record_attempt(9, True, 2)
    run.record_failure(None, "checkpoint d: meta.json is missing", DAMAGED_CHECKPOINT, checkpoint="d", file="meta.json")
    run.record_attempt(9, True, 1)  # no group failed since the attempt before: a resize, not a failure
    assert [a["cause"] for a in run.attempts()] == ["start", "preemption", "resize"]
    assert [(f["step"], f["reason"]) for f in run.failures(PREEMPTION)] == [
        (9, "SIGTERM: checkpointed at step 9 and handed over")]


def test_killed_processes_are_left_to_rays_restarts(tmp_path):
    classifier = FailureClassifier(str(tmp_path))
    for _ in range(3):  # no step known: never "the same step"
        classifier.after_exception(None, {0: ActorDiedError()})
    assert [f["step"] for f in RunDir(str(tmp_path)).failures()] == [None] * 3


def test_a_lost_process_after_the_step_of_the_failure_before_is_no_repeat(tmp_path):
    """A kill, a resume from an earlier checkpoint, then a lost node after the same step: each time rank 0 fails in
    a collective marked with step 44 while rank 1's process (or node) is gone. Neither failure says that step 44
    fails again; a real error after step 44 following one of them is not a repeat either, but a second one is."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    classifier = FailureClassifier(str(tmp_path))
    classifier.after_exception(None, {0: marked(RuntimeError("gloo: connection reset"), 44), 1: ActorDiedError()})
    node_lost = WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())
    classifier.after_exception(None, {0: marked(RuntimeError("gloo: connection reset"), 44), 1: node_lost})
    classifier.after_exception(None, {0: marked(RuntimeError("boom"), 44)})
    with pytest.raises(PermanentFailure, match="failed twice in a row after step 44: RuntimeError: boom"):
        classifier.after_exception(None, {0: marked(RuntimeError("boom"), 44)})
    assert [f.get("process_lost", False) for f in RunDir(str(tmp_path)).failures()] == [True, True, False, False]


def test_reason_is_the_workers_one_line_through_rays_wrappers():
    assert failures.reason(ControllerError(PermanentFailure("tasks.vqa.corpora: no split 'val'"))) == \
        "tasks.vqa.corpora: no split 'val'"
    group = WorkerGroupError("Training failed due to worker errors:\n...", {1: OSError("x"), 0: UserError("bad key")})
    assert failures.reason(group) == "bad key"
    assert failures.reason(RuntimeError("first line\nsecond line")) == "RuntimeError: first line"
    assert failures.reason(RuntimeError()) == "RuntimeError"
    assert len(failures.reason(UserError("x" * 2000))) == failures.MAX_REASON_CHARS


def test_a_store_that_does_not_answer_is_left_to_rays_restarts(tmp_path):
    from botocore.exceptions import ClientError, EndpointConnectionError

    from spatialnet_dist.store import s3, storage

    url = "s3://bucket/shards/x.tar"
    unreachable = s3.s3_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), url)
    busy = s3.s3_error(ClientError({"Error": {"Code": "SlowDown", "Message": "reduce your request rate"},
                                    "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"), url)
    missing_bucket = s3.s3_error(ClientError({"Error": {"Code": "NoSuchBucket"}}, "GetObject"), url)
    assert isinstance(unreachable, storage.StoreUnavailable) and isinstance(busy, storage.StoreUnavailable)
    assert failures.is_permanent(missing_bucket) and not isinstance(missing_bucket, storage.StoreUnavailable)

    classifier = FailureClassifier(str(tmp_path))
    classifier.after_exception(None, {0: marked(unreachable, 4)})  # retried by Ray
    assert RunDir(str(tmp_path)).failures()[-1]["reason"] == str(unreachable)
    with pytest.raises(PermanentFailure, match="failed twice in a row after step 4: cannot reach S3 endpoint"):
        classifier.after_exception(None, {0: marked(unreachable, 4)})


def test_a_full_disk_ends_the_run_at_once_classed_disk_full_even_when_failures_json_cannot_be_written(
        tmp_path, small_disk):
    """A full disk does not free itself: no restart, the one line, "cause": "disk_full" in failures.json; and where
    the run directory's own disk is the full one, the failure still ends the run with its line."""
    from spatialnet_dist.errors import DiskFull, disk_full

    error = disk_full(tmp_path / "run" / "checkpoint-000004" / "zero" / "ds" / "mp_rank_00_model_states.pt")
    assert isinstance(error, DiskFull)
    with pytest.raises(PermanentFailure) as raised:
        FailureClassifier(str(tmp_path / "run")).after_exception(None, {0: marked(error, 3)})
    assert str(raised.value) == str(error) and str(error).startswith("disk full: no space left writing ")
    entry = RunDir(str(tmp_path / "run")).failures()[-1]
    assert entry["cause"] == failures.DISK_FULL and entry["step"] == 3 and entry["reason"] == str(error)

    disk = small_disk.mount("64k")
    full = RunDir(str(disk / "run"))
    full.record_failure(1, "an earlier failure")
    small_disk.fill(disk, leave=0)
    with pytest.raises(PermanentFailure, match="^disk full: no space left writing "):
        FailureClassifier(full.url).after_exception(None, {0: marked(disk_full(disk / "run" / "metrics.jsonl"), 5)})
    assert [f["step"] for f in full.failures()] == [1]  # failures.json as it was, whole
