"""The step loop. Ray-agnostic: it runs in one process, under torchrun, or inside a Ray Train worker;
what it reports and where checkpoints go is the `Reporter`'s business.

One step = `optim.grad_accum` multi-task micro-batches -> SpatialNet-ViT -> weighted loss ->
DeepSpeed backward/step. Every rank runs the same schedule, so every rank reports the same number
of times (Ray Train's report is a barrier). Every RNG is a function of the position: micro-batch m
of the data is fixed by (seed, m, rank) (data/order.py), and torch, numpy and python's `random` are
reseeded from (seed, rank, step) at the start of every step, so dropout after a resume is the
dropout of the uninterrupted run.

Over 300 lines: the loop, its report window and the state it saves and restores (step, data position, EMA,
samples seen, RNG) are one object; apart, a reader would check the save against the loop in two files.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist import engine as ds
from spatialnet_dist import tasks as registry
from spatialnet_dist.batch_format import IMAGES, question_count
from spatialnet_dist.checkpoint_weights import pretraining_weights
from spatialnet_dist.config import Config
from spatialnet_dist.data.batches import TrainLoader, make_eval_loader, make_train_loader
from spatialnet_dist.data.order import stream_seed
from spatialnet_dist.errors import NonFiniteLoss, disk_full, has_no_room, is_disk_full
from spatialnet_dist.model.spatialnet import build_model
from spatialnet_dist.objective import MultiTaskObjective, loss_states
from spatialnet_dist.text import TextVocabs
from spatialnet_dist.train.ema import WeightEma
from spatialnet_dist.train.faults import StepHook

log = logging.getLogger("spatialnet.train")


class Reporter(Protocol):
    def report(self, step: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Called on every rank with the same steps; checkpoint_dir holds this rank's files."""

    def report_samples(self, step: int, samples: list[dict]) -> None:
        """Rank 0, at each validation: a few val images with their generated captions and answers."""


class ValidationPass(Protocol):
    """One validation's task metrics from the val sub-batches the Trainer reads for its losses (the split is read
    once): evaluate.run.ValidationPass, handed in by spatialnet_dist.jobs."""

    def add(self, task: str, sub: dict) -> None:
        """Every rank: one of its val sub-batches of `task`, as the loader gives it."""

    def finish(self) -> tuple[dict, list[dict]]:
        """Every rank (it may gather across ranks) -> ({"val/<task>_<metric>": value}, samples to show: rank 0's,
        [] elsewhere)."""


Validation = Callable[[torch.nn.Module, Config, TextVocabs, int, int], ValidationPass]  # (model, cfg, vocabs, rank, world_size)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Tensors to the device; images to the model's dtype (bf16 runs). Targets keep theirs."""
    non_blocking = device.type == "cuda"

    def move(key, v):
        if not torch.is_tensor(v):
            return v
        return v.to(device, dtype=dtype if key in ("image", IMAGES) else None, non_blocking=non_blocking)

    return {key: move(key, value) if key == IMAGES else {k: move(k, v) for k, v in value.items()}
            for key, value in batch.items()}


def _reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def training_device(cfg: Config) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cfg.train.use_gpu else torch.device("cpu")


def model_of(cfg: Config, vocabs: TextVocabs, pretrained: bool = False) -> torch.nn.Module:
    """The enabled tasks' model; under loss.balance=uncertainty with the learned task weights, which the engine
    trains with it. `pretrained`: its encoder starts from model.pretrained (the model the engine trains); the
    copies that Trainer.inference_model fills with the trained weights skip that read (of a whole checkpoint, maybe)."""
    model_cfg = cfg.model if pretrained else replace(cfg.model, pretrained="")
    return build_model(model_cfg, cfg.tasks.enabled(), vocabs, balance=cfg.loss.balance == "uncertainty",
                       pretraining=pretraining_weights(model_cfg.pretrained), task_cfgs=cfg.tasks)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """The step loop over a DeepSpeed `engine` and this rank's training batches (`loader`), both handed in
    (`Trainer.build` makes them from the config); `restore` puts both where a checkpoint left them, `fit` steps to
    train.max_steps, `save` writes this rank's part of a checkpoint. `validation` adds the task metrics to each
    validation's val losses (None: the losses alone); `hooks` (train/faults.py's StepHook) are called around each
    step; `stop_requested` (-> bool at each step boundary, the same on every rank: a pre-emption,
    train/preemption.py) checkpoints that step and ends fit() there."""

    def __init__(self, cfg: Config, vocabs: TextVocabs, rank: int, world_size: int, engine, loader: TrainLoader,
                 reporter: Reporter, validation: Validation | None, hooks: Sequence[StepHook] = (),
                 stop_requested: Callable[[], bool] | None = None):
        if not cfg.train.max_steps:
            raise ValueError("train.max_steps is 0: resolve train.epochs first (spatialnet_dist.train.plan.resolve)")
        self.cfg, self.vocabs, self.rank, self.world_size, self.reporter = cfg, vocabs, rank, world_size, reporter
        self.engine, self.loader, self.validation, self.hooks = engine, loader, validation, list(hooks)
        self.stop_requested = stop_requested or (lambda: False)
        self.tasks = cfg.tasks.enabled()
        self.device = training_device(cfg)
        self.dtype = torch.bfloat16 if ds.precision(cfg) == "bf16" else torch.float32
        # optim.ema_decay: the weights' moving average, updated after every optimizer step; what evaluation uses.
        self.ema = WeightEma(engine.module, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.objective = MultiTaskObjective(cfg.loss, loss_states(cfg, vocabs, self.tasks))
        self.step = 0
        self.samples_seen = dict.fromkeys(self.tasks, 0)  # images per task, all ranks, whole run (the loader's position)
        self.questions_seen = dict.fromkeys(registry.question_tasks(self.tasks), 0)  # vqa, regression

    @classmethod
    def build(cls, cfg: Config, vocabs: TextVocabs, rank: int, world_size: int, reporter: Reporter,
              validation: Validation | None, hooks: Sequence[StepHook] = (),
              stop_requested: Callable[[], bool] | None = None) -> Trainer:
        """The Trainer of the config's model (its encoder from model.pretrained), engine and training batches."""
        if not cfg.train.use_gpu:
            torch.set_num_threads(cfg.train.torch_threads or cfg.train.cpus_per_worker)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        engine = ds.create_engine(cfg, model_of(cfg, vocabs, pretrained=True), world_size)
        loader = make_train_loader(cfg, vocabs, rank, world_size)  # lazy: its workers start at the first batch
        return cls(cfg, vocabs, rank, world_size, engine, loader, reporter, validation, hooks, stop_requested)

    # ---- checkpoints ----

    def restore(self, directory: str | Path, weights_only: bool = False) -> int:
        """Load a checkpoint directory (this rank's view of it); -> the step it resumes at."""
        directory = Path(directory)
        meta = ckpt.read_meta(directory)
        # resharded when the checkpoint's world size differs
        with ckpt.zero_files(directory, self.world_size, weights_only) as (zero_dir, universal):
            ds.load_checkpoint(self.engine, zero_dir, ckpt.ZERO_TAG, weights_only=weights_only, universal=universal)
        if self.ema:
            saved = None if weights_only else ckpt.ema_weights(directory)
            if saved is None:  # a weights-only start, or a checkpoint of a run without EMA: from the loaded weights
                self.ema.reset(self.engine.module)
            else:
                self.ema.load_state_dict(saved)
        if weights_only:
            return self.step
        self.step = int(meta["step"])
        self.samples_seen.update(meta.get("samples_seen", {}))
        self.questions_seen.update(meta.get("questions_seen", {}))
        self.loader.restart_at(meta.get("stream", {}).get("micro_batches", self.step * self.cfg.optim.grad_accum))
        return self.step

    def save(self, directory: Path) -> None:
        """This rank's part of a checkpoint: its ZeRO shard (+ meta with the data position, the same on every rank,
        and the EMA, on rank 0)."""
        ds.save_checkpoint(self.engine, str(directory / ckpt.ZERO_DIR), ckpt.ZERO_TAG, {"step": self.step})
        if self.rank == 0:
            position = self.loader.position()
            meta = {"step": self.step, "samples_seen": position["rows"], "questions_seen": self.questions_seen,
                    "seed": self.cfg.run.seed, "world_size": self.world_size, "stream": position}
            ckpt.write_common(directory, meta, self.cfg, self.vocabs, self.ema.state_dict() if self.ema else None)

    # ---- the loop ----

    def fit(self) -> dict:
        """Step to train.max_steps, reporting as due; -> the last report's metrics. Closes the loader."""
        cfg = self.cfg
        window = _Window(self.tasks, self.device, self.world_size, self.step, self.loader.position()["rows"],
                         self.objective.report_keys(self.tasks))
        last_metrics: dict = {}
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                self._seed_step()
                for _ in range(cfg.optim.grad_accum):
                    batch = next(self.loader)
                    window.add(self._micro_step(to_device(batch, self.device, self.dtype)), batch)
                self.step += 1
                if self.ema:  # once per optimizer step, on every rank
                    self.ema.update(self.engine.module, self.step)
                window.time += time.perf_counter() - t0
                for hook in self.hooks:
                    hook.after_step(self.step)
                stop = self.stop_requested()
                last_metrics = self._report_if_due(window, checkpoint_now=stop) or last_metrics
                if stop:  # its checkpoint is complete in the run dir: the restart resumes from it
                    break
        finally:
            self.loader.close()
        return last_metrics

    def _seed_step(self) -> None:
        """Every RNG of this process from (seed, rank, step): dropout is a function of the position, not of history."""
        seed = stream_seed(self.cfg.run.seed, "step", self.rank, self.step)
        torch.manual_seed(seed)  # CUDA's generators too
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _micro_step(self, batch: dict) -> dict[str, torch.Tensor]:
        outputs = self.engine(batch)
        losses = self.objective(outputs, batch, self.engine.module)
        for hook in self.hooks:
            losses = hook.on_losses(self.step + 1, losses)  # the step in progress
        # No finiteness check here: it would sync the host with the GPU every micro-step. The report
        # step checks the window's sums (a NaN anywhere in it stays NaN there) and stops the run.
        self.engine.backward(losses["loss"])
        self.engine.step()
        return losses

    def _report_if_due(self, window: _Window, checkpoint_now: bool = False) -> dict | None:
        cfg, step = self.cfg, self.step
        last = step == cfg.train.max_steps
        log_due = step % cfg.train.log_every == 0 or last
        ckpt_due = step % cfg.train.checkpoint_every == 0 or last or checkpoint_now
        val_due = cfg.eval.every and step % cfg.eval.every == 0
        if not (log_due or ckpt_due or val_due):
            return None
        metrics = self._window_metrics(window.close(step, self.loader.position()["rows"], self.loader.skipped))
        if val_due:
            metrics.update(self.validate())
        with tempfile.TemporaryDirectory(prefix="spatialnet-ckpt-") as tmp:
            directory = None
            if ckpt_due:
                directory = Path(tmp)
                try:
                    self.save(directory)
                except Exception as e:  # torch.save hides ENOSPC in a RuntimeError: the disk is asked
                    if is_disk_full(e) or has_no_room(tmp):
                        raise disk_full(tmp, "a checkpoint staged in TMPDIR at") from None
                    raise
            self.reporter.report(step, metrics, directory)
        return metrics

    def _window_metrics(self, totals: _WindowTotals) -> dict:
        """A report's training metrics; adds the window's samples and questions to the run's counts."""
        metrics = {"step": self.step, **totals.losses}
        seconds = totals.seconds
        self.samples_seen.update(self.loader.position()["rows"])
        for task in self.tasks:
            metrics[f"samples_per_s/{task}"] = totals.samples[task] / seconds
            metrics[f"skipped/{task}"] = totals.skipped[task]
        for task in self.questions_seen:
            self.questions_seen[task] += totals.questions[task]
            metrics[f"questions_per_s/{task}"] = totals.questions[task] / seconds
        metrics["samples_per_s"] = sum(totals.samples.values()) / seconds
        metrics["step_time_s"] = seconds / totals.steps
        metrics["lr"] = self.engine.get_lr()[0]
        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
        return metrics

    # ---- evaluation ----

    def inference_model(self) -> torch.nn.Module:
        """A model every rank can run on its own (no collectives inside forward): with optim.ema_decay, a copy
        carrying the EMA weights."""
        def copy() -> torch.nn.Module:
            return model_of(self.cfg, self.vocabs)

        return self.ema.averaged_model(copy) if self.ema else ds.full_model(self.engine, copy)

    @torch.no_grad()
    def validate(self) -> dict:
        """Teacher-forced loss on up to eval.val_batches batches per task of the val split, and from the same
        batches the task metrics of `self.validation`; its sample images go to the reporter."""
        model = self.inference_model()
        model.eval()
        scoring = self.validation(model, self.cfg, self.vocabs, self.rank, self.world_size) if self.validation else None
        sums = torch.zeros(2 * len(self.tasks), dtype=torch.float64)
        for i, task in enumerate(self.tasks):
            loader = make_eval_loader(self.cfg, self.vocabs, task, "val", self.rank, self.world_size)
            for n, sub in enumerate(loader):
                if n >= self.cfg.eval.val_batches:
                    break
                if scoring is not None:
                    scoring.add(task, sub)
                size = registry.get(task).loss_size(sub)  # what the task's loss averages
                sub = to_device({task: sub}, self.device, next(model.parameters()).dtype)
                sums[2 * i] += self.objective.task_losses(model(sub), sub)[task].item() * size
                sums[2 * i + 1] += size
        sums = _reduce_sum(sums)
        metrics = {f"val/{t}_loss": (sums[2 * i] / sums[2 * i + 1]).item()
                   for i, t in enumerate(self.tasks) if sums[2 * i + 1] > 0}
        if scoring is not None:
            scores, samples = scoring.finish()
            metrics.update(scores)
            if samples:
                self.reporter.report_samples(self.step, samples)
        model.train()
        return metrics


@dataclass
class _WindowTotals:
    """A report window summed over all ranks."""

    steps: int
    losses: dict[str, float]  # the objective's report_keys ("loss", "<task>_loss", ...): means over the micro-steps
    samples: dict[str, int]  # images per task
    questions: dict[str, int]  # questions per vqa/regression task
    skipped: dict[str, int]  # bad-input samples per task, whole run (the streams' running count)
    seconds: float  # the window's step time, the ranks' mean


class _Window:
    """Loss sums, questions and step time since the last report; samples are differences of the loader's
    position (global rows per task, counted once), skips the streams' running count. `keys`: the objective's
    results it averages (MultiTaskObjective.report_keys)."""

    def __init__(self, tasks: list[str], device: torch.device, world_size: int, start_step: int,
                 rows: dict[str, int], keys: list[str]):
        self.tasks, self.device, self.world_size = tasks, device, world_size
        self.question_tasks = registry.question_tasks(tasks)
        self.keys = keys
        self._reset(start_step, rows)

    def _reset(self, step: int, rows: dict[str, int]) -> None:
        self.start_step = step
        self.rows_before = dict(rows)
        self.questions = dict.fromkeys(self.question_tasks, 0)
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        self.time = 0.0

    def add(self, losses: dict, batch: dict) -> None:
        # Accumulate on the device without a host sync: the report step reads them once.
        for i, key in enumerate(self.keys):
            if key in losses:
                self.sums[i] += losses[key].detach().double()
                self.counts[i] += 1
        for task in self.question_tasks:
            if task in batch:
                self.questions[task] += question_count(batch[task])

    def close(self, step: int, rows: dict[str, int], skipped: dict[str, int]) -> _WindowTotals:
        """Sum the window over ranks (a collective: every rank calls it) and start the next one at `step`.
        `rows`: the loader's position (global rows per task, all ranks); `skipped`: this rank's running count.
        Raises NonFiniteLoss when a loss summed to NaN or inf."""
        steps = max(1, step - self.start_step)
        seconds = self.time if self.time > 0 else float("nan")
        local = torch.cat([  # one collective for everything the report sums over ranks
            self.sums.cpu(), self.counts.cpu(),
            torch.tensor([skipped.get(t, 0) for t in self.tasks], dtype=torch.float64),
            torch.tensor([self.questions[t] for t in self.question_tasks], dtype=torch.float64),
            torch.tensor([seconds], dtype=torch.float64),
        ])
        total = _reduce_sum(local)
        k, n = len(self.keys), len(self.tasks)
        sums, counts = total[:k], total[k: 2 * k]
        skipped_total, questions = total[2 * k: 2 * k + n], total[2 * k + n: -1]
        bad = [key for i, key in enumerate(self.keys) if counts[i] > 0 and not math.isfinite(sums[i])]
        if bad:
            raise NonFiniteLoss(f"non-finite {', '.join(bad)} between steps {step - steps + 1} and {step}; "
                                "lower optim.lr or check the inputs")
        totals = _WindowTotals(
            steps=steps,
            losses={key: (sums[i] / counts[i]).item() for i, key in enumerate(self.keys) if counts[i] > 0},
            samples={t: rows.get(t, 0) - self.rows_before.get(t, 0) for t in self.tasks},
            questions={t: int(questions[i]) for i, t in enumerate(self.question_tasks)},
            skipped={t: int(skipped_total[i]) for i, t in enumerate(self.tasks)},
            seconds=total[-1].item() / self.world_size,
        )
        self._reset(step, rows)
        return totals
