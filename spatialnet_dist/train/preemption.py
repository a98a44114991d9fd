"""Pre-emption: SIGTERM to a training worker (how a spot reclaim or a Kubernetes eviction begins) -> every rank
checkpoints at the next step boundary -> Ray Train restarts the worker group from that step, charging its
pre-emption budget (FailureConfig.max_preemption_failures, unlimited), not train.max_failures.

Ray Train V2 (2.60) handles pre-emption notices for whole nodes only: a PreemptionWatcher sees a node drain in
the GCS and marks the workers' PreemptionInfo; the controller then waits until the group has finished or the
info's deadline has passed and restarts it as a PreemptionError. A process's SIGTERM reaches none of that (Ray's
own handler makes the worker exit: a crash, charged to max_failures). So here:

1. `SigtermHandler` (a Ray Train worker-group callback) installs `_on_sigterm` in every worker process, on the
   actor's main thread (the only one that may set signal handlers), in place of Ray's exit.
2. `_on_sigterm` notes the signal and gives Ray the same PreemptionInfo a node drain would (this rank, deadline =
   now + train.preemption_grace_s): from its next poll the controller is in its pre-empting state, where an
   unfinished group is restarted once the deadline passes, as a pre-emption, whatever the ranks are doing.
3. `StopCheck`, at each step boundary, all-reduces one int (did any rank get SIGTERM?) so that every rank
   checkpoints at the same step (trainer.Trainer's `stop_requested`).
4. `hand_over`, after that checkpoint: the signalled rank moves its deadline to now, and every rank waits to be
   stopped. A rank must not return (Ray would call the run finished) nor raise (in the pre-empting state any
   worker error is a failure).
5. `training_over`, once a rank's training and evaluation are done and it returns: a SIGTERM from then on is Ray
   shutting the finished group down, and gets Ray's own exit, with no checkpoint nor warning.
A pre-emption that signals every process of the worker at once is the same: its loader processes leave SIGTERM
to it (data/batches.py), so the batches keep coming up to that step boundary.
If the step boundary does not come within the grace period, the controller restarts the group at the deadline
and it resumes from the checkpoint before: steps are lost, max_failures is still untouched.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import ray
import torch
import torch.distributed as dist
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2._internal.execution.context import get_train_context
from ray.train.v2.api.preemption import PreemptionInfo

log = logging.getLogger("spatialnet.train")

_signalled = threading.Event()  # this worker process received SIGTERM
_finished = threading.Event()  # this worker process's training function is returning: nothing left to checkpoint


def _tell_ray(deadline_s: float) -> None:
    """This rank is pre-empted, by `deadline_s` (epoch seconds): what Ray's PreemptionWatcher would say."""
    context = get_train_context()
    context.preemption_context.preemption_info = PreemptionInfo(
        deadline_ms=int(deadline_s * 1000),
        preempted_node_to_ranks={ray.get_runtime_context().get_node_id(): [context.get_world_rank()]})


def _install(grace_s: float) -> None:
    pid = os.getpid()
    ray_exit = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL  # Ray's handler (None: one set outside Python)

    def _on_sigterm(signum, frame):
        # A process forked from this one: the signal means what it always did. (A data loader's takes SIGTERM over
        # as it starts and leaves a pre-emption's to this process: data/batches.py.) A finished worker: Ray's exit.
        forked = os.getpid() != pid
        if forked or _finished.is_set():
            signal.signal(signal.SIGTERM, signal.SIG_DFL if forked else ray_exit)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if not _signalled.is_set():
            _signalled.set()
            _tell_ray(time.time() + grace_s)
            log.warning("SIGTERM: checkpointing at the next step boundary (grace %.0f s), then restarting", grace_s)

    signal.signal(signal.SIGTERM, _on_sigterm)


def training_over() -> None:
    """This rank's training function returns normally (called on its own thread): a later SIGTERM is Ray's shutdown
    of the group, no pre-emption."""
    _finished.set()


class SigtermHandler(WorkerGroupCallback):
    """Runs on Ray Train's controller: each new worker group gets the SIGTERM handler before it trains."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s

    def after_worker_group_start(self, worker_group) -> None:
        worker_group.execute(_install, self.grace_s)  # each worker actor's own tasks run on its main thread


class StopCheck:
    """`check()` at a step boundary: whether any rank has received SIGTERM, the same answer on every rank. One int
    all-reduced (MAX) per step on a gloo group, so a GPU run syncs no device for it."""

    def __init__(self):
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.stopped = False

    def check(self) -> bool:
        flag = torch.tensor([int(_signalled.is_set())], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.stopped = bool(flag.item())
        return self.stopped


def hand_over() -> None:
    """After the pre-emption checkpoint, on every rank: let Ray restart the group now; never returns."""
    if _signalled.is_set():
        _tell_ray(time.time())
    while True:
        time.sleep(60)
