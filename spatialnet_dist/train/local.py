"""Training without Ray: one process, or one per GPU under torchrun. The same Trainer as the Ray path,
and the same checkpoints: published complete into `<run_dir>/checkpoint-<step>/` (a local dir shared by
all ranks, or S3), resumed from the run's last complete one.

  torchrun --nproc-per-node 8 -m spatialnet_dist.jobs --config configs/paper.yaml

(spatialnet_dist.jobs runs `main` with evaluate/'s validation: train/ does not import evaluate/.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist import engine as ds
from spatialnet_dist.errors import UserError
from spatialnet_dist.store import storage
from spatialnet_dist.text import TextVocabs
from spatialnet_dist.train import preflight
from spatialnet_dist.train.checkpointing import CheckpointManager
from spatialnet_dist.train.faults import fault_hooks
from spatialnet_dist.train.launch import load_config, parse_args, prepare_data
from spatialnet_dist.train.plan import for_world, resolve
from spatialnet_dist.train.rundir import RunDir
from spatialnet_dist.train.tracking import RunTracker
from spatialnet_dist.train.trainer import Trainer, Validation


class LocalReporter:
    """Rank 0 writes metrics.jsonl and its tracker (TensorBoard, MLflow); every rank publishes its checkpoint files
    through the run's CheckpointManager (the Ray path's too)."""

    def __init__(self, run_url: str, rank: int, cfg):
        self.run, self.rank = RunDir(run_url), rank
        self.checkpoints = CheckpointManager(self.run, rank, cfg)
        self.tracker: RunTracker | None = None  # rank 0's, opened once the run knows its start step

    def report(self, step: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            self.checkpoints.publish(step, checkpoint_dir, metrics)
        if self.rank == 0:
            self.run.append_metrics(metrics)
            if self.tracker:
                self.tracker.log_metrics(step, metrics)
            print(json.dumps(metrics), flush=True)
            for line in self.run.record_outages(step):
                print(f"rank 0: {line}", file=sys.stderr, flush=True)

    def report_samples(self, step: int, samples: list[dict]) -> None:
        if self.tracker:
            self.tracker.log_samples(step, samples)


def train(cfg, vocabs: TextVocabs, run_url: str, rank: int, world_size: int, validation: Validation | None) -> Trainer:
    """Run (or resume from the run dir's last complete checkpoint, else train.resume) to max_steps;
    -> the trainer."""
    cfg = for_world(cfg, world_size)  # this world's share of each task's global batch
    reporter = LocalReporter(run_url, rank, cfg)
    hooks = fault_hooks(cfg, rank, reporter.run)
    trainer = Trainer.build(cfg, vocabs, rank, world_size, reporter, validation, hooks)
    resumed = reporter.checkpoints.restore(trainer)
    if rank == 0:
        for line in reporter.run.start_attempt(trainer.step, resumed, world_size):
            print(line, flush=True)
        reporter.tracker = RunTracker(cfg, reporter.run, trainer.step)
    trainer.fit()
    if reporter.tracker:
        reporter.tracker.close()
    return trainer


def main(argv: list[str] | None, validation: Validation | None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # A plain `python -m` start is a world of one; torchrun sets these for every rank.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, value)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        cfg = load_config(args)
        if rank == 0:
            prepare_data(cfg)
            preflight.run_all(cfg, storage.join(cfg.run.storage, cfg.run.name))
    except UserError as e:
        print(f"spatialnet: error: {e}", file=sys.stderr)
        return 2
    if cfg.train.use_gpu:
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    own_group = not dist.is_initialized()  # torchrun and `python -m` make none; a caller (a test) may have one
    ds.init_distributed(cfg.train.use_gpu)
    dist.barrier()  # rank 0 may have generated the demo corpus
    try:
        cfg, plan = resolve(cfg, world_size, ckpt.resumed_meta(storage.join(cfg.run.storage, cfg.run.name),
                                                                cfg.train.resume))
    except UserError as e:
        print(f"spatialnet: error: {e}", file=sys.stderr)
        return 2
    if plan and rank == 0:
        print(plan, flush=True)
    from spatialnet_dist.data.vocab import build_vocabs

    vocabs = build_vocabs(cfg)
    run_url = storage.join(cfg.run.storage, cfg.run.name)
    if rank == 0:
        RunDir(run_url).write_config(cfg)
    trainer = train(cfg, vocabs, run_url, rank, world_size, validation)
    if rank == 0:
        damaged = RunDir(run_url).attempts()[-1].get("damaged", [])  # passed over by this run's resume
        print("RESULT " + json.dumps({"final_step": trainer.step, "run_dir": run_url, "damaged_checkpoints": damaged}),
              flush=True)
    if own_group:
        ds.close_distributed()
    return 0
