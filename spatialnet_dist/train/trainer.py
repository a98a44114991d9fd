"""The step loop. Ray-agnostic: it runs in one process, under torchrun, or inside a Ray Train worker;
what it reports and where checkpoints go is the `Reporter`'s business.

One step = `optim.grad_accum` multi-task micro-batches -> SpatialNet-ViT -> weighted loss ->
DeepSpeed backward/step. Every rank runs the same schedule, so every rank reports the same number
of times (Ray Train's report is a barrier).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from spatialnet_dist import tasks as registry
from spatialnet_dist.config import Config
from spatialnet_dist.data.batch_format import question_count
from spatialnet_dist.data.batches import STATS_KEY, StreamState, make_eval_loader, make_train_loader
from spatialnet_dist.errors import NonFiniteLoss, UserError
from spatialnet_dist.model import build_model
from spatialnet_dist.objective import MultiTaskObjective, loss_states
from spatialnet_dist.text import TextVocabs
from spatialnet_dist.train import checkpoint as ckpt
from spatialnet_dist.train import engine as ds

log = logging.getLogger("spatialnet.train")


class Reporter(Protocol):
    def report(self, step: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Called on every rank with the same steps; checkpoint_dir holds this rank's files."""

    def settle(self) -> None:
        """Return once the last reported checkpoint is one a restart would resume from."""

    def report_samples(self, step: int, samples: list[dict]) -> None:
        """Rank 0, at each validation: a few val images with their generated captions and answers."""


def to_device(batch: dict, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Tensors to the device; images to the model's dtype (bf16 runs). Targets keep theirs."""
    non_blocking = device.type == "cuda"

    def move(key, v):
        if not torch.is_tensor(v):
            return v
        return v.to(device, dtype=dtype if key == "image" else None, non_blocking=non_blocking)

    return {task: {k: move(k, v) for k, v in sub.items()} for task, sub in batch.items()}


def _reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    def __init__(self, cfg: Config, vocabs: TextVocabs, rank: int, world_size: int, reporter: Reporter,
                 fault_marker=None):
        self.cfg, self.vocabs, self.rank, self.world_size, self.reporter = cfg, vocabs, rank, world_size, reporter
        self.fault_marker = fault_marker  # callable -> bool: claims the one-time fault (faults.fail_at_step)
        if not cfg.train.max_steps:
            raise ValueError("train.max_steps is 0: resolve train.epochs first (spatialnet_dist.train.plan.resolve)")
        self.tasks = cfg.tasks.enabled()
        if cfg.train.use_gpu:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(cfg.train.torch_threads or cfg.train.cpus_per_worker)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, self.tasks, vocabs)
        self.engine = ds.create_engine(cfg, model, world_size)
        self.dtype = torch.bfloat16 if ds.precision(cfg) == "bf16" else torch.float32
        self.objective = MultiTaskObjective(cfg.loss, loss_states(cfg, vocabs, self.tasks))
        self.step = 0
        self.stream_state: StreamState | None = None
        self.samples_seen = dict.fromkeys(self.tasks, 0)  # images per task, all ranks, whole run
        self.questions_seen = dict.fromkeys(registry.question_tasks(self.tasks), 0)  # vqa, regression

    # ---- checkpoints ----

    def restore(self, directory: str | Path, weights_only: bool = False) -> int:
        """Load a checkpoint directory (this rank's view of it); -> the step it resumes at."""
        directory = Path(directory)
        meta = ckpt.read_meta(directory)
        ds.load_checkpoint(self.engine, str(directory / ckpt.ZERO_DIR), ckpt.ZERO_TAG, weights_only=weights_only)
        if weights_only:
            return self.step
        self.step = int(meta["step"])
        self.samples_seen.update(meta.get("samples_seen", {}))
        self.questions_seen.update(meta.get("questions_seen", {}))
        stream_file = directory / "streams" / f"rank-{self.rank}.json"
        if stream_file.is_file():
            self.stream_state = StreamState.from_dict(json.loads(stream_file.read_text()))
        return self.step

    def save(self, directory: Path) -> None:
        """This rank's part of a checkpoint: its ZeRO shard and stream state (+ meta on rank 0)."""
        ds.save_checkpoint(self.engine, str(directory / ckpt.ZERO_DIR), ckpt.ZERO_TAG, {"step": self.step})
        (directory / "streams").mkdir(exist_ok=True)
        (directory / "streams" / f"rank-{self.rank}.json").write_text(json.dumps(self.loader.state.to_dict()))
        if self.rank == 0:
            meta = {"step": self.step, "samples_seen": self.samples_seen, "questions_seen": self.questions_seen,
                    "seed": self.cfg.run.seed, "world_size": self.world_size}
            ckpt.write_common(directory, meta, self.cfg, self.vocabs)

    # ---- the loop ----

    def fit(self) -> dict:
        cfg = self.cfg
        self.loader = make_train_loader(cfg, self.vocabs, self.rank, self.world_size,
                                        seed_offset=self.step, state=self.stream_state)
        window = _Window(self.tasks, self.device, self.step)
        last_metrics: dict = {}
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                for _ in range(cfg.optim.grad_accum):
                    batch = next(self.loader)
                    batch.pop(STATS_KEY)
                    losses = self._micro_step(to_device(batch, self.device, self.dtype))
                    window.add(losses, batch)
                self.step += 1
                window.time += time.perf_counter() - t0
                self._maybe_fail()
                last_metrics = self._report_if_due(window) or last_metrics
        finally:
            self.loader.close()
        return last_metrics

    def _micro_step(self, batch: dict) -> dict[str, torch.Tensor]:
        outputs = self.engine(batch)
        losses = self.objective(outputs, batch, self.engine.module)
        if self._fault_due("nan_loss", self.step + 1):  # the step in progress
            losses = {key: value * float("nan") for key, value in losses.items()}
        # No finiteness check here: it would sync the host with the GPU every micro-step. The report
        # step checks the window's sums (a NaN anywhere in it stays NaN there) and stops the run.
        self.engine.backward(losses["loss"])
        self.engine.step()
        return losses

    def _fault_due(self, kind: str, step: int) -> bool:
        faults = self.cfg.faults
        return self.rank == 0 and faults.kind == kind and step == faults.fail_at_step

    def _maybe_fail(self) -> None:
        """faults.fail_at_step, to prove how each failure class ends (config.FaultsConfig): rank 0 dies
        abruptly once per run, or raises on every attempt."""
        where = f"faults.fail_at_step={self.step}"
        if self._fault_due("exit", self.step) and self.fault_marker and self.fault_marker():
            self.reporter.settle()  # so that the restart shows a resume from the last checkpoint
            log.warning("%s: rank 0 exits abruptly now", where)
            os._exit(17)
        if self._fault_due("error", self.step):
            raise RuntimeError(f"{where}: injected error")
        if self._fault_due("user_error", self.step):
            raise UserError(f"{where}: injected user error")

    def _report_if_due(self, window: _Window) -> dict | None:
        cfg, step = self.cfg, self.step
        last = step == cfg.train.max_steps
        log_due = step % cfg.train.log_every == 0 or last
        ckpt_due = step % cfg.train.checkpoint_every == 0 or last
        val_due = cfg.eval.every and step % cfg.eval.every == 0
        if not (log_due or ckpt_due or val_due):
            return None
        metrics = window.flush(step, self)
        if val_due:
            metrics.update(self.validate())
        with tempfile.TemporaryDirectory(prefix="spatialnet-ckpt-") as tmp:
            directory = None
            if ckpt_due:
                directory = Path(tmp)
                self.save(directory)
            self.reporter.report(step, metrics, directory)
        return metrics

    # ---- evaluation ----

    def inference_model(self) -> torch.nn.Module:
        """A model every rank can run on its own (no collectives inside forward)."""
        return ds.full_model(self.engine, lambda: build_model(self.cfg.model, self.tasks, self.vocabs))

    @torch.no_grad()
    def validate(self) -> dict:
        """Teacher-forced loss on up to eval.val_batches batches per task of the val split, and the
        task metrics that need no java (evaluate.run.validation_metrics); its sample images go to the reporter."""
        from spatialnet_dist.evaluate.run import validation_metrics

        model = self.inference_model()
        model.eval()
        sums = torch.zeros(2 * len(self.tasks), dtype=torch.float64)
        for i, task in enumerate(self.tasks):
            loader = make_eval_loader(self.cfg, self.vocabs, task, "val", self.rank, self.world_size)
            for n, sub in enumerate(loader):
                if n >= self.cfg.eval.val_batches:
                    break
                sub = to_device({task: sub}, self.device, next(model.parameters()).dtype)
                losses = self.objective(model(sub), sub)
                size = registry.get(task).loss_size(sub[task])  # what the task's loss averages
                sums[2 * i] += losses[f"{task}_loss"].item() * size
                sums[2 * i + 1] += size
        sums = _reduce_sum(sums)
        metrics = {f"val/{t}_loss": (sums[2 * i] / sums[2 * i + 1]).item()
                   for i, t in enumerate(self.tasks) if sums[2 * i + 1] > 0}
        scores, samples = validation_metrics(model, self.cfg, self.vocabs, self.rank, self.world_size)
        metrics.update(scores)
        if samples:
            self.reporter.report_samples(self.step, samples)
        model.train()
        return metrics


class _Window:
    """Loss sums, sample (image) counts and vqa/regression question counts since the last report."""

    def __init__(self, tasks: list[str], device: torch.device, start_step: int):
        self.tasks, self.device = tasks, device
        self.question_tasks = registry.question_tasks(tasks)
        self.keys = ["loss"] + [f"{t}_loss" for t in tasks]
        self.last_step = start_step
        self._reset()

    def _reset(self):
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        self.samples = dict.fromkeys(self.tasks, 0)
        self.questions = dict.fromkeys(self.question_tasks, 0)
        self.time = 0.0

    def add(self, losses: dict, batch: dict) -> None:
        # Accumulate on the device without a host sync: the report step reads them once.
        for i, key in enumerate(self.keys):
            if key in losses:
                self.sums[i] += losses[key].detach().double()
                self.counts[i] += 1
        for task, sub in batch.items():
            self.samples[task] += len(sub["image_id"])
            if task in self.questions:
                self.questions[task] += question_count(sub)

    def flush(self, step: int, trainer: Trainer) -> dict:
        steps, self.last_step = max(1, step - self.last_step), step
        state = trainer.loader.state
        seconds = self.time if self.time > 0 else float("nan")
        local = torch.cat([  # one collective for everything the report sums over ranks
            self.sums.cpu(), self.counts.cpu(),
            torch.tensor([self.samples[t] for t in self.tasks], dtype=torch.float64),
            torch.tensor([state.skipped.get(t, 0) for t in self.tasks], dtype=torch.float64),
            torch.tensor([self.questions[t] for t in self.question_tasks], dtype=torch.float64),
            torch.tensor([seconds], dtype=torch.float64),
        ])
        total = _reduce_sum(local)
        k, n = len(self.keys), len(self.tasks)
        sums, counts = total[:k], total[k: 2 * k]
        samples, skipped = total[2 * k: 2 * k + n], total[2 * k + n: 2 * k + 2 * n]
        questions = total[2 * k + 2 * n: -1]
        elapsed = total[-1].item() / trainer.world_size  # the ranks' mean
        metrics = {"step": step}
        for i, key in enumerate(self.keys):
            if counts[i] > 0:
                metrics[key] = (sums[i] / counts[i]).item()
        for i, task in enumerate(self.tasks):
            trainer.samples_seen[task] += int(samples[i])
            metrics[f"samples_per_s/{task}"] = samples[i].item() / elapsed
            metrics[f"skipped/{task}"] = int(skipped[i])
        for i, task in enumerate(self.question_tasks):
            trainer.questions_seen[task] += int(questions[i])
            metrics[f"questions_per_s/{task}"] = questions[i].item() / elapsed
        metrics["samples_per_s"] = samples.sum().item() / elapsed
        metrics["step_time_s"] = elapsed / steps
        metrics["lr"] = trainer.engine.get_lr()[0]
        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
        bad = [key for i, key in enumerate(self.keys) if counts[i] > 0 and not math.isfinite(sums[i])]
        if bad:
            raise NonFiniteLoss(f"non-finite {', '.join(bad)} between steps {step - steps + 1} and {step}; "
                                "lower optim.lr or check the inputs")
        self._reset()
        return metrics
