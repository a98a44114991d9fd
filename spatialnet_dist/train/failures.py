"""Failure classes of a Ray Train run: which failures end it at once, and the one line that says why.

Permanent (the run ends on this attempt, no restart): a `UserError` or `NonFiniteLoss` from any worker,
or the same step failing twice in a row. A full disk (`errors.DiskFull`, a UserError: it does not free itself) is
one, recorded with `"cause": "disk_full"`. A restart from the same checkpoint meets those again.
Transient (Ray Train restarts the worker group, up to `train.max_failures`): everything else, e.g. a
killed process, a lost node, a store that does not answer after its retries (`StoreUnavailable`, a
UserError that may pass).

Ray Train V2 (2.60) builds its FailurePolicy in a private factory from FailureConfig alone, which has
no per-error setting. What it does offer: an exception raised by a `ray.train.UserCallback` on the
controller becomes a ControllerError, and its DefaultFailurePolicy never retries a ControllerError that
is not a worker-group startup failure. So `FailureClassifier.after_exception`, which Ray calls with each
rank's exception before it decides, raises `PermanentFailure` for a permanent class and leaves the rest
to Ray's own restarts.

"The same step": a worker marks the exception it raises with the step its trainer had completed
(`mark_step`; Ray pickles the exception with its attributes); the classifier records each failure in
the run directory's failures.json, so a restart that fails after the same step as the failure just
before it ends the run. A failure in which some rank's process or node died (`lost_a_process`) never counts:
the other ranks fail in a collective after whatever step the death met, and a run resumed from an earlier
checkpoint passes that step again (a kill, then a lost node, both after step 44: tests/test_chaos.py met it).
"""

from __future__ import annotations

import logging

from ray.train import ControllerError, UserCallback, WorkerGroupError

from spatialnet_dist.errors import DiskFull, NonFiniteLoss, UserError
from spatialnet_dist.store.storage import StoreUnavailable
from spatialnet_dist.train.rundir import RunDir

log = logging.getLogger(__name__)
STEP_ATTRIBUTE = "spatialnet_failed_after_step"
DISK_FULL = "disk_full"  # failures.json's "cause" of a worker group ended by a full disk (errors.DiskFull)
MAX_REASON_CHARS = 500


class PermanentFailure(Exception):
    """A failure no restart can fix; the message is the failing worker's one-line reason."""


PERMANENT = (UserError, NonFiniteLoss, PermanentFailure)


def is_permanent(error: BaseException) -> bool:
    return isinstance(error, PERMANENT) and not isinstance(error, StoreUnavailable)


def mark_step(error: BaseException, step: int) -> None:
    setattr(error, STEP_ATTRIBUTE, step)


def failed_step(error: BaseException) -> int | None:
    return getattr(error, STEP_ATTRIBUTE, None)


def lost_a_process(error: BaseException) -> bool:
    """A worker's process or its node died (Ray's health check failed on it, or its actor died): a kill, the OOM
    killer, a lost machine. Nothing about the step it died after says the step will fail again."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    return isinstance(error, (ActorDiedError, ActorUnavailableError, WorkerHealthCheckFailedError,
                              WorkerHealthCheckTimeoutError))


def primary(worker_errors: dict[int, BaseException]) -> BaseException:
    """The error that explains a worker group's failure: the lowest rank's permanent one, else the lowest
    rank's (the other ranks usually fail in a collective because that one left)."""
    ranks = sorted(worker_errors)
    permanent = [r for r in ranks if is_permanent(worker_errors[r])]
    return worker_errors[(permanent or ranks)[0]]


def reason(error: BaseException) -> str:
    """One line: the worker's own message, unwrapped from Ray's ControllerError / WorkerGroupError."""
    if isinstance(error, ControllerError):
        return reason(error.controller_failure)
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        return reason(primary(error.worker_failures))
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else ""
    if not isinstance(error, PERMANENT):  # ours name what failed already; anything else: say what it is
        line = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line[:MAX_REASON_CHARS]


class FailureClassifier(UserCallback):
    """Runs on Ray Train's controller: ends the run on a permanent failure, records every failure."""

    def __init__(self, run_url: str):
        self.run_url = run_url

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        run = RunDir(self.run_url)
        error = primary(worker_exceptions)
        steps = [s for s in map(failed_step, worker_exceptions.values()) if s is not None]
        step = min(steps) if steps else None
        why = reason(error)
        previous = run.failures()
        # A failure where a process died (its peers then fail in a collective, marked with their step) is no
        # evidence that the step fails again: it never counts as, or towards, "the same step twice".
        died = any(lost_a_process(e) for e in worker_exceptions.values())
        facts = {"cause": DISK_FULL} if isinstance(error, DiskFull) else {}
        try:
            run.record_failure(step, why, **facts, **({"process_lost": True} if died else {}))
        except DiskFull as e:  # the run directory's disk is the full one: the failure itself still ends the run
            log.warning("failures.json not written: %s", e)
        if is_permanent(error):
            raise PermanentFailure(why)
        if (step is not None and not died and previous and previous[-1]["step"] == step
                and not previous[-1].get("process_lost")):
            raise PermanentFailure(f"failed twice in a row after step {step}: {why}")
