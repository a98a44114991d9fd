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
from spatialnet_dist.store import storage
from spatialnet_dist.text import TextVocabs
from spatialnet_dist.train import failures, plan
from spatialnet_dist.train.rundir import BestCheckpoint, RunDir
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
    """Every rank reports; rank 0 also writes metrics.jsonl and its tracker (TensorBoard, MLflow), and keeps
    the best checkpoint (eval.keep_best). Checkpoints are published complete by `ckpt.publish` (files, then
    the manifest), pruned by it and resumed by `ckpt.resume`: the run's one checkpoint manager. Ray gets the
    metrics alone: a checkpoint registered with it too stays named in Ray's run snapshot after
    run.keep_checkpoints has pruned it, and Ray Train refuses to start the next job of that run directory."""

    def __init__(self, run: RunDir, rank: int, keep_checkpoints: int, keep_best: str = ""):
        self.run, self.rank, self.keep_checkpoints = run, rank, keep_checkpoints
        self.tracker: RunTracker | None = None  # rank 0's, opened once the attempt knows its start step
        self.best = BestCheckpoint(run, keep_best if rank == 0 else "")  # off on the other ranks

    def report(self, step: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        if self.rank == 0:
            self.run.append_metrics(metrics)
            self.tracker.log_metrics(step, metrics)
            log.info("step %d %s", step, _brief(metrics))
            for line in self.run.record_outages(step):
                log.info("rank 0: %s", line)
        if checkpoint_dir is not None:
            ckpt.publish(checkpoint_dir, self.run.url, step, self.rank, self.keep_checkpoints, self.best.url)
            self.best.consider(step, metrics)
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
    reporter = RayReporter(run, rank, cfg.run.keep_checkpoints, cfg.eval.keep_best)
    stop_check = preemption.StopCheck()
    trainer = Trainer(cfg, vocabs, rank, world_size, reporter, validation,
                      fault_marker=lambda: run.claim_fault(cfg.faults.fail_at_step), stop_requested=stop_check.check)
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
    resumed = ckpt.resume(trainer, run.url, cfg.train.resume, cfg.train.resume_weights_only)
    if rank == 0:
        ckpt.prune(run.url, cfg.run.keep_checkpoints, reporter.best.url)  # partial leftovers of the attempt before
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
        best = _same_on_every_rank(reporter.best.record)
        if best is not None and best["step"] != trainer.step:  # else the model holds its weights already
            if rank == 0:
                log.info("rank 0: evaluating the best checkpoint, step %d (%s=%.4g)", best["step"], best["metric"],
                         best["value"])
            ckpt.load_weights(model, run.path(ckpt.checkpoint_name(best["step"])))
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
