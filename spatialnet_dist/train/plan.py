"""What a config means on a given number of workers: the one place of the batch arithmetic.

- `tasks.<task>.global_batch_size`: the task's samples per optimizer step over all workers. The driver
  (`resolve`) records it for every enabled task: as the config gives it, else as the run's checkpoint
  recorded it (a resumed run keeps its global batch on any number of workers), else
  `batch_size` x workers x `optim.grad_accum` (the config's batch is per worker on the planned workers);
- the per-worker `batch_size` = global_batch_size / (world size x grad_accum): `for_world`, in every worker
  with its actual world size (elastic runs: the driver does not know it), and at the driver for the
  planned one, so that a world size that cannot keep the global batch stops before any worker starts;
- `train.epochs` -> `train.max_steps`, from the training rows the manifests count and the global batch;
- `model.freeze_encoder_blocks` checked against the preset's depth.

The resolved config (the one saved with the run and sent to the workers) carries the results, so a
restarted worker group trains the same steps with the same global batches.
"""

from __future__ import annotations

import copy
import math

from spatialnet_dist import tasks as registry
from spatialnet_dist.config import Config, ConfigError
from spatialnet_dist.data.streams import MAX_QUESTIONS_PER_VISIT
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.manifest import TRAIN_SPLIT, manifest_url, read_manifest


def task_rows(task: str, manifest: dict, split: str, per_image: int = 0) -> tuple[int, float]:
    """(training rows of `task` in one corpus split, rows one visit consumes on average).

    A visit is one slot of the task's sub-batch: one image read, decoded and encoded once. A task's rows
    are its `epoch_rows` (tasks/<task>.py): images, one per visit, for classification and tagging; the
    captions, questions or count questions for captioning, vqa and regression, so an epoch means every
    caption (question) once; a visit trains up to `per_image` of its image's captions (questions) (0: all, up to
    the data code's cap), so rows per visit is that number or the split's mean per image, whichever is
    smaller (the mean stands in for the per-image counts the manifest does not keep).
    """
    info = manifest["splits"].get(split)
    if info is None:
        raise UserError(f"no split {split!r} (splits: {', '.join(sorted(manifest['splits'])) or 'none'})")
    definition = registry.get(task)
    rows = definition.epoch_rows(manifest, info)
    if not definition.per_visit_key:  # one row per image visit
        return rows, 1
    per_visit = min(per_image or MAX_QUESTIONS_PER_VISIT, rows / max(info["samples"], 1))
    return rows, max(per_visit, 1.0)


def per_worker_batch(cfg: Config, task: str, world_size: int) -> int:
    """The task's sub-batch per worker per micro-step: `batch_size`, or the share of its global batch."""
    tc = getattr(cfg.tasks, task)
    if not tc.global_batch_size:
        return tc.batch_size
    slots = world_size * cfg.optim.grad_accum
    if tc.global_batch_size % slots:
        raise ConfigError(f"config key tasks.{task}.global_batch_size: {tc.global_batch_size} is not a multiple of "
                          f"{world_size} workers x optim.grad_accum {cfg.optim.grad_accum} = {slots}")
    return tc.global_batch_size // slots


def global_batch(cfg: Config, task: str, world_size: int, recorded: dict | None = None) -> int:
    """The task's samples per optimizer step over all workers: the config's `global_batch_size`, else the
    one `recorded` (the resumed checkpoint's meta.json: its resolved config and world_size), else
    `batch_size` x `world_size` workers x `optim.grad_accum`."""
    tc = getattr(cfg.tasks, task)
    if tc.global_batch_size:
        return tc.global_batch_size
    if recorded:
        saved = recorded["config"]
        saved_task = saved.get("tasks", {}).get(task, {})
        if saved_task.get("global_batch_size"):
            return saved_task["global_batch_size"]
        if "batch_size" in saved_task:  # written before the global batch was recorded
            accum = saved.get("optim", {}).get("grad_accum", 1)
            return saved_task["batch_size"] * int(recorded.get("world_size", 1)) * accum
    return tc.batch_size * world_size * cfg.optim.grad_accum


def for_world(cfg: Config, world_size: int) -> Config:
    """A copy of a resolved config with every enabled task's per-worker `batch_size` for `world_size`
    workers (one line naming the key when the global batch does not split evenly over them)."""
    cfg = copy.deepcopy(cfg)
    for task in cfg.tasks.enabled():
        getattr(cfg.tasks, task).batch_size = per_worker_batch(cfg, task, world_size)
    return cfg


def epoch_steps(cfg: Config) -> tuple[int, dict[str, int], dict[str, float]]:
    """-> (max_steps for train.epochs, training rows per epoch per task, global rows per step per task),
    from a config whose global batches are recorded (`resolve`): the same on any number of workers.

    The enabled task with the most rows sets the length (DESIGN: passes over the largest task's rows); the
    others pass over theirs as often as their batches take them. In `alternate` mode a step trains one of
    the n enabled tasks, so each task gets 1/n of the steps on average.
    """
    tasks = cfg.tasks.enabled()
    share = 1 / len(tasks) if cfg.train.mode == "alternate" else 1.0
    rows, per_step = {}, {}
    manifests: dict[str, dict] = {}
    for task in tasks:
        total, visits = 0, 0.0
        tc = getattr(cfg.tasks, task)
        per_image = getattr(tc, registry.get(task).per_visit_key) if registry.get(task).per_visit_key else 0
        for corpus in getattr(cfg.tasks, task).corpora:
            if corpus not in manifests:
                manifests[corpus] = read_manifest(cfg.data.root, corpus)
            try:
                n, per_visit = task_rows(task, manifests[corpus], TRAIN_SPLIT, per_image)
            except UserError as e:
                raise UserError(f"{manifest_url(cfg.data.root, corpus)}: {e}") from None
            total, visits = total + n, visits + n / per_visit
        rows[task] = total
        per_visit = total / visits if visits else 1.0  # over the task's corpora, weighted by their rows
        per_step[task] = getattr(cfg.tasks, task).global_batch_size * per_visit * share
    largest = max(tasks, key=lambda t: rows[t])
    if rows[largest] == 0:
        raise UserError(f"config key train.epochs: the {TRAIN_SPLIT} splits of the enabled tasks' corpora hold no rows")
    return math.ceil(cfg.train.epochs * rows[largest] / per_step[largest]), rows, per_step


def resolve(cfg: Config, world_size: int, recorded: dict | None = None) -> tuple[Config, str]:
    """-> (the config to train with, a one-line summary for the log; "" when nothing was derived).
    world_size: the workers the run is planned on; recorded: the meta.json of the checkpoint it resumes
    (`global_batch`)."""
    from spatialnet_dist.networks.encoder import meta_encoder

    depth = len(meta_encoder(cfg.model.preset).blocks)
    if cfg.model.freeze_encoder_blocks > depth:
        raise ConfigError(f"config key model.freeze_encoder_blocks: {cfg.model.freeze_encoder_blocks} exceeds the "
                          f"{depth} blocks of preset {cfg.model.preset}")
    cfg = copy.deepcopy(cfg)
    notes = []
    given = [t for t in cfg.tasks.enabled() if getattr(cfg.tasks, t).global_batch_size]
    for task in cfg.tasks.enabled():
        getattr(cfg.tasks, task).global_batch_size = global_batch(cfg, task, world_size, recorded)
    cfg = for_world(cfg, world_size)
    shown = cfg.tasks.enabled() if recorded else given
    if shown:
        batches = ", ".join(f"{t} {getattr(cfg.tasks, t).batch_size}" for t in shown)
        notes.append(f"batch_size per worker = global_batch_size / ({world_size} workers x "
                     f"{cfg.optim.grad_accum} accum): {batches}")
    if cfg.train.epochs:
        cfg.train.max_steps, rows, per_step = epoch_steps(cfg)
        notes.append(f"train.epochs={cfg.train.epochs:g} -> train.max_steps={cfg.train.max_steps}; rows per epoch: "
                     + ", ".join(f"{t} {n}" for t, n in rows.items()) + "; global rows per step: "
                     + ", ".join(f"{t} {n:g}" for t, n in per_step.items()))
    return cfg, "; ".join(notes)
