"""Ray Train glue: the function every worker runs. Resume from the run's last complete checkpoint (or
`train.resume`), run the Trainer, publish checkpoints and report metrics from every rank, evaluate at the end.
The validation and the end-of-run evaluation come in as callables (spatialnet_dist.jobs hands in
evaluate/'s): train/ does not import evaluate/.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist import config as config_mod
from spatialnet_dist import engine as ds
from spatialnet_dist import versions
from spatialnet_dist.checkpoint_weights import load_weights
from spatialnet_dist.store import storage
from spatialnet_dist.text import TextVocabs
from spatialnet_dist.train import failures, plan
from spatialnet_dist.train.checkpointing import CheckpointManager
from spatialnet_dist.train.faults import fault_hooks
from spatialnet_dist.train.rundir import RunDir
from spatialnet_dist.train.tracking import RunTracker
from spatialnet_dist.train.trainer import Trainer, Validation

versions.require("ray")  # before importing Ray Train's private module, which other versions may lack

import ray.train  # noqa: E402
from ray.train.v2._internal.execution import context as ray_train_context  # noqa: E402

from spatialnet_dist.train import preemption  # noqa: E402  (Ray Train internals too)

log = logging.getLogger("spatialnet.train")

# (model, cfg, vocabs, rank, world_size, run, rank 0's tracker or None) -> the headline test metrics for Ray's
# last report (rank 0's; {} elsewhere). Every rank calls it; it writes <run dir>/eval/ and logs to the tracker.
Evaluation = Callable[[torch.nn.Module, config_mod.Config, TextVocabs, int, int, RunDir, RunTracker | None], dict]


class RayReporter:
    """Every rank reports; rank 0 also writes metrics.jsonl and its tracker (TensorBoard, MLflow). Checkpoints go
    to the run's CheckpointManager (the torchrun path's too). Ray gets the metrics alone: a checkpoint registered
    with it too stays named in Ray's run snapshot after run.keep_checkpoints has pruned it, and Ray Train refuses
    to start the next job of that run directory. And only at checkpoint steps (the same on every rank): each
    ray.train.report is a barrier of the ranks through a Ray actor, then a put into a one-slot queue that the
    controller drains when it polls, so a report every step or two held the step loop (py-spy, bench/overhead.py);
    nothing reads Ray's copy of the metrics (RESULT and `spatialnet runs` read metrics.jsonl)."""

    def __init__(self, run: RunDir, rank: int, checkpoints: CheckpointManager):
        self.run, self.rank, self.checkpoints = run, rank, checkpoints
        self.tracker: RunTracker | None = None  # rank 0's, opened once the attempt knows its start step

    def report(self, step: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        if self.rank == 0:
            self.run.append_metrics(metrics)
            self.tracker.log_metrics(step, metrics)
            log.info("step %d %s", step, _brief(metrics))
            for line in self.run.record_outages(step):
                log.info("rank 0: %s", line)
        if checkpoint_dir is not None:
            self.checkpoints.publish(step, checkpoint_dir, metrics)
            ray.train.report(metrics)

    def report_samples(self, step: int, samples: list[dict]) -> None:
        self.tracker.log_samples(step, samples)


def _brief(metrics: dict) -> str:
    keys = [k for k in metrics if k == "loss" or k.endswith("_loss")] + ["samples_per_s"]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def train_loop_per_worker(config: dict, validation: Validation, evaluation: Evaluation) -> None:
    """Ray Train's per-worker function, once spatialnet_dist.jobs has bound `validation` and `evaluation`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Ray Train logs every report's whole metrics dict (its logger is named after its file); ours is one line.
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    # The driver recorded each task's global batch; this worker's share depends on the world size it got.
    cfg = plan.for_world(config_mod.from_dict(config["config"]), world_size)
    storage.set_retry_budget(cfg.data.s3_retry_seconds)  # inherited by the forked loader workers
    vocabs = TextVocabs.from_dict(config["vocab"])
    run = RunDir(config["run_dir"])

    ds.init_distributed(cfg.train.use_gpu)
    reporter = RayReporter(run, rank, CheckpointManager(run, rank, cfg))
    stop_check = preemption.StopCheck()
    hooks = fault_hooks(cfg, rank, run)
    trainer = Trainer.build(cfg, vocabs, rank, world_size, reporter, validation, hooks, stop_check.check)
    try:
        _resume_train_evaluate(trainer, reporter, evaluation, run, stop_check)
    except Exception as e:
        failures.mark_step(e, trainer.step)  # the controller ends a run whose same step fails twice
        raise
    preemption.training_over()  # Ray's shutdown of the finished group SIGTERMs this process: no pre-emption


def _resume_train_evaluate(trainer: Trainer, reporter: RayReporter, evaluation: Evaluation, run: RunDir,
                           stop_check: preemption.StopCheck) -> None:
    cfg, vocabs, rank, world_size = trainer.cfg, trainer.vocabs, trainer.rank, trainer.world_size
    # The run's own last complete checkpoint (Ray knows of none: RayReporter), the same on every path.
    resumed = reporter.checkpoints.restore(trainer)
    if rank == 0:
        for line in run.start_attempt(trainer.step, resumed, world_size):
            log.info("rank 0: %s", line)
        reporter.tracker = RunTracker(cfg, run, trainer.step)
        log.info("rank 0: %s at step %d of %d", "resuming" if resumed else "starting", trainer.step,
                 cfg.train.max_steps)

    trainer.fit()
    if stop_check.stopped and trainer.step < cfg.train.max_steps:
        if rank == 0:
            run.end_attempt("preemption", trainer.step)
            log.info("rank 0: pre-empted; checkpointed at step %d, handing over", trainer.step)
        preemption.hand_over()

    if cfg.eval.at_end:
        model = trainer.inference_model()
        best = _same_on_every_rank(reporter.checkpoints.best.record)
        if best is not None and best["step"] != trainer.step:  # else the model holds its weights already
            if rank == 0:
                log.info("rank 0: evaluating the best checkpoint, step %d (%s=%.4g)", best["step"], best["metric"],
                         best["value"])
            load_weights(model, run.path(ckpt.checkpoint_name(best["step"])))
        headline = evaluation(model, cfg, vocabs, rank, world_size, run, reporter.tracker)
        # The same number of reports on every rank: the evaluation's is the last.
        ray.train.report({"step": trainer.step, "eval_done": True, **headline})
    if rank == 0:
        reporter.tracker.close()


def _same_on_every_rank(value):
    """Rank 0's `value` on every rank (the best checkpoint: only rank 0 scores the validation metrics)."""
    values = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(values, src=0)
    return values[0]
