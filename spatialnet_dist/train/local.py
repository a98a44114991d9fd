"""Training without Ray: one process, or one per GPU under torchrun. The same Trainer as the Ray path;
checkpoints go straight into `<run_dir>/checkpoint-<step>/`, which must be shared by all ranks.

  torchrun --nproc-per-node 8 -m spatialnet_dist.train.local --config configs/paper.yaml
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from spatialnet_dist.errors import UserError
from spatialnet_dist.text import TextVocabs
from spatialnet_dist.train import engine as ds
from spatialnet_dist.train import preflight
from spatialnet_dist.train.launch import load_config, parse_args, prepare_data
from spatialnet_dist.train.plan import resolve
from spatialnet_dist.train.rundir import RunDir
from spatialnet_dist.train.tracking import RunTracker
from spatialnet_dist.train.trainer import Trainer


class LocalReporter:
    """Rank 0 writes metrics.jsonl and its tracker (TensorBoard, MLflow); every rank moves its checkpoint
    files into the shared run dir."""

    def __init__(self, run_dir: Path, rank: int):
        self.run_dir, self.rank = run_dir, rank
        self.run = RunDir(str(run_dir))
        self.last_checkpoint: Path | None = None
        self.tracker: RunTracker | None = None  # rank 0's, opened once the run knows its start step

    def report(self, step: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            target = self.run_dir / f"checkpoint-{step:06d}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            self.last_checkpoint = target
        if self.rank == 0:
            self.run.append_metrics(metrics)
            if self.tracker:
                self.tracker.log_metrics(step, metrics)
            print(json.dumps(metrics), flush=True)
        if dist.is_initialized():
            dist.barrier()  # the checkpoint is complete once every rank has copied its files

    def report_samples(self, step: int, samples: list[dict]) -> None:
        if self.tracker:
            self.tracker.log_samples(step, samples)

    def settle(self) -> None:
        """Nothing to wait for: a checkpoint is in the run dir when report() returns."""


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in run_dir.glob("checkpoint-*") if (p / "meta.json").is_file())
    return found[-1] if found else None


def train(cfg, vocabs: TextVocabs, run_dir: Path, rank: int, world_size: int) -> Trainer:
    """Run (or resume from the run dir's last checkpoint) to max_steps; -> the trainer."""
    reporter = LocalReporter(run_dir, rank)
    trainer = Trainer(cfg, vocabs, rank, world_size, reporter,
                      fault_marker=lambda: reporter.run.claim_fault(cfg.faults.fail_at_step))
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        trainer.restore(resume)
    if rank == 0:
        reporter.run.truncate_metrics(trainer.step)
        reporter.tracker = RunTracker(cfg, reporter.run, trainer.step)
    trainer.fit()
    if reporter.tracker:
        reporter.tracker.close()
    return trainer


def main(argv: list[str] | None = None) -> int:
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
            preflight.run_all(cfg, str(Path(cfg.run.storage) / cfg.run.name))
    except UserError as e:
        print(f"spatialnet: error: {e}", file=sys.stderr)
        return 2
    if cfg.train.use_gpu:
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ds.init_distributed(cfg.train.use_gpu)
    dist.barrier()  # rank 0 may have generated the demo corpus
    try:
        cfg, plan = resolve(cfg, world_size)
    except UserError as e:
        print(f"spatialnet: error: {e}", file=sys.stderr)
        return 2
    if plan and rank == 0:
        print(plan, flush=True)
    from spatialnet_dist.data.vocab import build_vocabs

    vocabs = build_vocabs(cfg)
    run_dir = Path(cfg.run.storage) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        RunDir(str(run_dir)).write_config(cfg)
    trainer = train(cfg, vocabs, run_dir, rank, world_size)
    if rank == 0:
        print("RESULT " + json.dumps({"final_step": trainer.step, "run_dir": str(run_dir)}), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
