"""The run's checkpoint manager, one for the Ray and the torchrun paths (torchtitan's CheckpointManager): restore
the newest complete checkpoint that verifies, publish each rank's staged files complete, prune to
run.keep_checkpoints and the best one (eval.keep_best). The layout, publishing and verified reading are
spatialnet_dist.checkpoint's; Ray is told of no checkpoint (train/worker.py says why)."""

from __future__ import annotations

from pathlib import Path

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist.config import Config
from spatialnet_dist.train.rundir import BestCheckpoint, RunDir


class CheckpointManager:
    """Every rank holds one; rank 0 alone prunes and keeps the best (`best`, off on the other ranks)."""

    def __init__(self, run: RunDir, rank: int, cfg: Config):
        self.run, self.rank = run, rank
        self.keep = cfg.run.keep_checkpoints
        self.start_from, self.weights_only = cfg.train.resume, cfg.train.resume_weights_only
        self.best = BestCheckpoint(run, cfg.eval.keep_best if rank == 0 else "")

    def restore(self, trainer) -> dict | None:
        """Every rank: `trainer` from the run's newest complete checkpoint that verifies, else train.resume
        (checkpoint.resume); then rank 0 prunes the partial leftovers of the attempt before. -> what it resumed,
        or None."""
        resumed = ckpt.resume(trainer, self.run.url, self.start_from, self.weights_only)
        if self.rank == 0:
            ckpt.prune(self.run.url, self.keep, self.best.url)
        return resumed

    def publish(self, step: int, staged: Path, metrics: dict) -> None:
        """Every rank: its staged files of step `step` into the run's checkpoint-N, complete once all ranks' are
        (checkpoint.publish, which prunes); then whether its validation `metrics` make it the best."""
        ckpt.publish(staged, self.run.url, step, self.rank, self.keep, self.best.url)
        self.best.consider(step, metrics)

