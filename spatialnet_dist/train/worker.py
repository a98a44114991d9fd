"""Ray Train glue: the function every worker runs. Resume from the run's last complete checkpoint (or
`train.resume`), run the Trainer, report metrics and checkpoints from every rank, evaluate at the end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from spatialnet_dist import config as config_mod
from spatialnet_dist import tasks as registry
from spatialnet_dist import versions
from spatialnet_dist.store import storage
from spatialnet_dist.text import TextVocabs
from spatialnet_dist.train import checkpoint as ckpt
from spatialnet_dist.train import engine as ds
from spatialnet_dist.train import failures
from spatialnet_dist.train.rundir import RunDir
from spatialnet_dist.train.tracking import RunTracker
from spatialnet_dist.train.trainer import Trainer

versions.require("ray")  # before importing Ray Train's private module, which other versions may lack

import ray.train  # noqa: E402
from ray.train.v2._internal.execution import context as ray_train_context  # noqa: E402

log = logging.getLogger("spatialnet.train")


class RayReporter:
    """Every rank reports; rank 0 also writes metrics.jsonl and its tracker (TensorBoard, MLflow). Checkpoints
    are published complete by `ckpt.publish` (files, then the manifest) and only then reported to Ray, which
    registers them as they are."""

    def __init__(self, run: RunDir, rank: int, keep_checkpoints: int):
        self.run, self.rank, self.keep_checkpoints = run, rank, keep_checkpoints
        self.last_checkpoint: str | None = None  # its directory name in the run dir
        self.tracker: RunTracker | None = None  # rank 0's, opened once the attempt knows its start step

    def report(self, step: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        if self.rank == 0:
            self.run.append_metrics(metrics)
            self.tracker.log_metrics(step, metrics)
            log.info("step %d %s", step, _brief(metrics))
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        self.last_checkpoint = ckpt.checkpoint_name(step)
        ckpt.publish(checkpoint_dir, self.run.url, step, self.rank, self.keep_checkpoints)
        ray_storage = ray.train.get_context().get_storage()  # the same run dir, as Ray's filesystem sees it
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint(f"{ray_storage.experiment_fs_path}/{self.last_checkpoint}",
                                            filesystem=ray_storage.storage_filesystem),
            checkpoint_dir_name=self.last_checkpoint,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )

    def report_samples(self, step: int, samples: list[dict]) -> None:
        self.tracker.log_samples(step, samples)

    def settle(self, timeout_s: float = 60.0) -> None:
        """Wait until Ray's controller has taken in the last reported checkpoint: it does so when it next
        polls the workers (every 2 s), and records it in the run's checkpoint_manager_snapshot.json. A
        worker group that fails before that restarts from the checkpoint before."""
        deadline = time.monotonic() + timeout_s
        while self.last_checkpoint and not self.run.ray_registered(self.last_checkpoint):
            if time.monotonic() > deadline:
                log.warning("Ray has not registered %s after %.0f s", self.last_checkpoint, timeout_s)
                return
            time.sleep(0.5)


def _brief(metrics: dict) -> str:
    keys = [k for k in metrics if k == "loss" or k.endswith("_loss")] + ["samples_per_s"]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def train_loop_per_worker(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Ray Train logs every report's whole metrics dict (its logger is named after its file); ours is one line.
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    cfg = config_mod.from_dict(config["config"])
    storage.set_retry_budget(cfg.data.s3_retry_seconds)  # inherited by the forked loader workers
    vocabs = TextVocabs.from_dict(config["vocab"])
    run = RunDir(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()

    ds.init_distributed(cfg.train.use_gpu)
    reporter = RayReporter(run, rank, cfg.run.keep_checkpoints)
    trainer = Trainer(cfg, vocabs, rank, world_size, reporter,
                      fault_marker=lambda: run.claim_fault(cfg.faults.fail_at_step))
    try:
        _resume_train_evaluate(trainer, reporter, cfg, vocabs, run)
    except Exception as e:
        failures.mark_step(e, trainer.step)  # the controller ends a run whose same step fails twice
        raise



def _resume_train_evaluate(trainer: Trainer, reporter: RayReporter, cfg: config_mod.Config, vocabs: TextVocabs,
                           run: RunDir) -> None:
    rank, world_size = trainer.rank, trainer.world_size
    # The run's own last complete checkpoint rather than Ray's last registered one: the same on every
    # path, and never one that keep_checkpoints has pruned since.
    resumed = ckpt.resume(trainer, run.url, cfg.train.resume, cfg.train.resume_weights_only)
    if rank == 0:
        ckpt.prune(run.url, cfg.run.keep_checkpoints)  # partial leftovers of the attempt before
        run.truncate_metrics(trainer.step)
        run.record_attempt(trainer.step, resumed)
        reporter.tracker = RunTracker(cfg, run, trainer.step)
        log.info("rank 0: %s at step %d of %d", "resuming" if resumed else "starting", trainer.step,
                 cfg.train.max_steps)

    trainer.fit()

    if cfg.eval.at_end:
        from spatialnet_dist.evaluate.run import evaluate_model

        metrics = evaluate_model(trainer.inference_model(), cfg, vocabs, cfg.eval.split, rank, world_size,
                                 out_dir=run.path("eval"), metrics_jsonl=run.path("metrics.jsonl"),
                                 tracker=reporter.tracker)
        # The same number of reports on every rank: the evaluation's is the last.
        ray.train.report({"step": trainer.step, "eval_done": True, **_flat(metrics if rank == 0 else {})})
    if rank == 0:
        reporter.tracker.close()


def _flat(metrics: dict) -> dict:
    """Headline test metrics for Ray's result (each task's `headline_keys`; the full set is in eval/metrics.json)."""
    return {f"test/{task}_{key}": metrics[task][key] for task in metrics
            for key in registry.get(task).headline_keys if key in metrics[task]}
