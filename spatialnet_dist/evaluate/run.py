"""Evaluate a model on a split: predict every sample, score once, write metrics, predictions and the report.

Two callers, one path:
- the end of training: every Ray Train worker calls `evaluate_model` with its rank; each predicts its
  share of the split's shards, the rows are gathered to rank 0 (torch.distributed), which scores and writes;
- `spatialnet eval run`: `evaluate_checkpoint` predicts in this process or spread over Ray tasks, then
  scores and writes the same files.

The output folder (local or s3://):
  metrics.json      {task: its scores}: one key per task evaluated (its registry name: "captioning", "vqa",
                    ...), each with its "baselines" (the task's `baselines`) (written last)
  predictions/      each task's `prediction_files`: captions.json + captions_references.json (the
                    `spatialnet eval captions` inputs), vqa.json (the `spatialnet eval vqa` input), ...
  report.md         and its PNG figures (spatialnet_dist.evaluate.report, a section per task)

What is done per task is the task's (spatialnet_dist/tasks/<task>.py); this module runs the tasks.
Just over 300 lines: both callers' paths (in a Ray Train worker, and `eval run` over Ray tasks) end in the
same `finish`, which is why they share this file.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spatialnet_dist import tasks as registry
from spatialnet_dist.config.checks import KNN_METRIC
from spatialnet_dist.evaluate.knn import knn_accuracy
from spatialnet_dist.evaluate.report import write_report
from spatialnet_dist.store import storage
from spatialnet_dist.text import TextVocabs

log = logging.getLogger(__name__)

REPORT_IMAGES = 8  # sample images in the report's grid
VAL_SAMPLES = 4  # validation images shown with their generated captions and answers at each validation


@dataclass
class SplitPredictions:
    """Prediction rows per task, and the first few images (model inputs, (H, W, C)) for the report."""

    rows: dict[str, list[dict]] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)


# ---- prediction ----


def _without_sample_only(task: str, row: dict) -> dict:
    """The row less its task's `sample_only_keys` (large fields only the report's sample images show)."""
    return {k: v for k, v in row.items() if k not in registry.get(task).sample_only_keys}


def _predict_batch(model, task: str, sub: dict, cfg, vocabs: TextVocabs, images: dict[str, np.ndarray]) -> list[dict]:
    """One sub-batch's prediction rows; its first images (model inputs) join `images`, up to REPORT_IMAGES, and
    only their rows keep the task's sample_only_keys."""
    param = next(model.parameters())
    rows = registry.get(task).predict(model, sub, sub["image"].to(param.device, param.dtype), cfg, vocabs)
    for image_id, image in zip(sub["image_id"], sub["image"]):  # image (C, H, W)
        if len(images) < REPORT_IMAGES and image_id not in images:
            images[image_id] = image.permute(1, 2, 0).float().cpu().numpy()  # (H, W, C)
    return [r if r["image_id"] in images else _without_sample_only(task, r) for r in rows]


@torch.no_grad()
def predict_split(
    model, cfg, vocabs: TextVocabs, split: str, rank: int = 0, world_size: int = 1, max_rows: int = 0,
) -> SplitPredictions:
    """This rank's share of `split`: prediction rows (one per image, per question for vqa and regression)
    for every task the model has a head for, at most `max_rows` per task when > 0. Captions by beam search
    (eval.beam_size)."""
    from spatialnet_dist.data.batches import make_eval_loader

    model.eval()
    out = SplitPredictions()
    for task in [t for t in cfg.tasks.enabled() if t in model.heads]:
        rows: list[dict] = []
        for sub in make_eval_loader(cfg, vocabs, task, split, rank, world_size):
            rows += _predict_batch(model, task, sub, cfg, vocabs, out.images)
            if max_rows and len(rows) >= max_rows:
                break
        out.rows[task] = rows[:max_rows] if max_rows else rows
    return out


def _merge(rows_of_parts: list[dict[str, list[dict]]], images: dict[str, np.ndarray]) -> SplitPredictions:
    """Rows of all ranks in a fixed order, whatever the world size, with the given report images."""
    tasks = [t for t in registry.names() if any(t in rows for rows in rows_of_parts)]
    merged = {t: sorted((r for rows in rows_of_parts for r in rows.get(t, [])), key=registry.get(t).row_key)
              for t in tasks}
    return SplitPredictions(merged, images)


def _gather(mine: SplitPredictions, rank: int, world_size: int) -> SplitPredictions | None:
    """All ranks' rows on rank 0 (a collective: every rank calls it); None on the other ranks."""
    if world_size == 1:
        return _merge([mine.rows], mine.images)
    import torch.distributed as dist

    parts: list = [None] * world_size
    dist.all_gather_object(parts, mine.rows)  # images stay where they are: rank 0 shows its own
    return _merge(parts, mine.images) if rank == 0 else None


# ---- scoring ----


def score_predictions(rows: dict[str, list[dict]], cfg, vocabs: TextVocabs) -> dict:
    """{task: rows} -> {task: its scores} for the tasks with rows that can be scored.

    Rows are put in one order first (by the task's row key): ranks return them in any order, and the
    bootstrap intervals resample by position, so the same predictions must give the same intervals."""
    metrics = {}
    for task, task_rows in rows.items():
        definition = registry.get(task)
        scores = definition.score(sorted(task_rows, key=definition.row_key), cfg, vocabs) if task_rows else None
        if scores is not None:
            metrics[task] = scores
    return metrics


# ---- writing ----


def trivial_baselines(rows: dict[str, list[dict]], cfg, vocabs: TextVocabs) -> dict:
    """{task: prediction rows} -> {task: {baseline key: its scores (the task scorer's shape) and a "name"}}
    for the tasks with rows and baselines (each task's `baselines`, learnt through metrics/baselines.py)."""
    out = {task: registry.get(task).baselines(task_rows, cfg, vocabs) for task, task_rows in rows.items() if task_rows}
    return {task: baselines for task, baselines in out.items() if baselines}


@contextmanager
def _staging(out_dir: str):
    """A local folder to write into: out_dir itself, or a temporary one uploaded to s3:// on success."""
    if not storage.is_s3(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="spatialnet-eval-") as tmp:
        yield Path(tmp)
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file() and p.name != "metrics.json"):
            storage.put_file(str(path), storage.join(out_dir, path.relative_to(tmp).as_posix()))
        storage.put_file(str(Path(tmp) / "metrics.json"), storage.join(out_dir, "metrics.json"))  # last: complete


def _report_samples(pred: SplitPredictions, vocabs: TextVocabs) -> list[dict]:
    """The report's sample images, each with what every task predicted for it (`Task.sample_fields`)."""
    by_image: dict[str, dict[str, list[dict]]] = {}  # image id -> task -> its rows
    for task, rows in pred.rows.items():
        for r in rows:
            by_image.setdefault(r["image_id"], {}).setdefault(task, []).append(r)
    samples = []
    for image_id, image in pred.images.items():
        sample = {"image": image, "image_id": image_id, "qa": []}
        for task, rows in by_image.get(image_id, {}).items():
            sample.update(registry.get(task).sample_fields(rows, vocabs))
        samples.append(sample)
    return samples


def _prediction_files(pred: SplitPredictions, vocabs: TextVocabs) -> dict[str, object]:
    files: dict[str, object] = {}
    for task, rows in pred.rows.items():
        files.update(registry.get(task).prediction_files([_without_sample_only(task, r) for r in rows], vocabs))
    return files


def finish(
    pred: SplitPredictions,
    cfg,
    vocabs: TextVocabs,
    out_dir: str,
    metrics_jsonl: str | None = None,
    title: str = "Evaluation report",
    tracker=None,
    split: str = "test",
) -> dict:
    """Score gathered predictions, each task beside its baselines (in its "baselines"), and write
    metrics.json, predictions/ and the report; and to the run's `tracker` (train.tracking.RunTracker)
    when given."""
    if cfg.eval.max_samples:
        pred = SplitPredictions({t: r[: cfg.eval.max_samples] for t, r in pred.rows.items()}, pred.images)
    empty = [t for t, r in pred.rows.items() if not r]
    if empty:
        log.warning("evaluation: no samples for %s in the split; not scored", ", ".join(empty))
    metrics = score_predictions(pred.rows, cfg, vocabs)
    for task, baselines in trivial_baselines(pred.rows, cfg, vocabs).items():
        if task in metrics:
            metrics[task]["baselines"] = baselines
    with _staging(out_dir) as local, tempfile.TemporaryDirectory(prefix="spatialnet-metrics-") as tmp:
        files = _prediction_files(pred, vocabs)
        (local / "predictions").mkdir(exist_ok=True)
        for name, content in files.items():
            (local / "predictions" / name).write_text(json.dumps(content, indent=1))
        history = None
        if metrics_jsonl and storage.exists(metrics_jsonl):
            history = Path(tmp) / "metrics.jsonl"
            history.write_bytes(storage.read_bytes(metrics_jsonl))
        predictions = {name.removesuffix(".json"): f"predictions/{name}" for name in files}
        samples = _report_samples(pred, vocabs)
        write_report(local, metrics, history, predictions, samples, title)
        (local / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if tracker is not None:
            tracker.log_evaluation(metrics, samples, local, split)
    return metrics


# ---- the callers ----


class ValidationPass:
    """One periodic validation's task metrics, from the val sub-batches the Trainer reads for its val losses, so
    the val split is read once: every rank `add`s its sub-batches, then calls `finish` (it gathers).

    A task with `validation_keys` (VQA accuracy, classification accuracy, count MAE, ...) predicts every
    sub-batch, scored once on rank 0. A task without (captioning: beam search and the java scorers at every
    validation would cost more than the training steps between them) is left to its validation loss; rank 0
    predicts its first sub-batch alone, for the sample images. With eval.knn.corpus, the encoder's k-nearest-neighbour
    accuracy on that corpus joins them (evaluate/knn.py: it reads the corpus itself). Handed to the Trainer by
    spatialnet_dist.jobs."""

    def __init__(self, model, cfg, vocabs: TextVocabs, rank: int, world_size: int):
        self.model, self.cfg, self.vocabs, self.rank, self.world_size = model, cfg, vocabs, rank, world_size
        self.scored = SplitPredictions()  # tasks with validation_keys: this rank's rows
        self.shown = SplitPredictions()  # the others: rank 0's first sub-batch

    @torch.no_grad()
    def add(self, task: str, sub: dict) -> None:
        """One val sub-batch of `task` as the loader gives it (images on the CPU)."""
        if task not in self.model.heads:
            return
        if registry.get(task).validation_keys:
            rows = _predict_batch(self.model, task, sub, self.cfg, self.vocabs, self.scored.images)
            self.scored.rows[task] = self.scored.rows.get(task, []) + rows
        elif self.rank == 0 and task not in self.shown.rows:
            rows = _predict_batch(self.model, task, sub, self.cfg, self.vocabs, self.shown.images)
            self.shown.rows[task] = rows[:VAL_SAMPLES]

    def finish(self) -> tuple[dict, list[dict]]:
        """-> ({"val/<task>_<key>": score, and val/knn_accuracy with eval.knn} on rank 0, {} on the others; samples:
        on rank 0, up to VAL_SAMPLES val images with their generated captions and answers (write_report's format),
        for TensorBoard)."""
        knn = knn_accuracy(self.model, self.cfg, self.rank, self.world_size) if self.cfg.eval.knn.corpus else None
        pred = _gather(self.scored, self.rank, self.world_size)
        if pred is None:
            return {}, []
        scores = score_predictions(pred.rows, self.cfg, self.vocabs)
        metrics = {f"val/{task}_{key}": scores[task][key] for task in pred.rows
                   for key in registry.get(task).validation_keys if key in scores.get(task, {})}
        if knn is not None:
            metrics[f"val/{KNN_METRIC}"] = knn
        shown = SplitPredictions({**pred.rows, **self.shown.rows}, {**self.shown.images, **pred.images})
        return metrics, _report_samples(shown, self.vocabs)[:VAL_SAMPLES]


def evaluate_model(
    model,
    cfg,
    vocabs: TextVocabs,
    split: str,
    rank: int,
    world_size: int,
    out_dir: str,
    metrics_jsonl: str | None = None,
    tracker=None,
) -> dict:
    """Every rank calls this at the end of training; -> the metrics on rank 0, {} on the others.
    tracker: rank 0's train.tracking.RunTracker, which gets the metrics, samples and report too."""
    per_rank = math.ceil(cfg.eval.max_samples / world_size) if cfg.eval.max_samples else 0
    pred = _gather(predict_split(model, cfg, vocabs, split, rank, world_size, per_rank), rank, world_size)
    if pred is None:
        return {}
    return finish(pred, cfg, vocabs, out_dir, metrics_jsonl, title=f"{cfg.run.name}: evaluation on the {split} split",
                  tracker=tracker, split=split)


def _predict_with_ray(checkpoint: str, cfg, split: str, workers: int) -> SplitPredictions:
    """Each of `workers` Ray tasks loads the model and predicts its share of the shards."""
    import ray

    from spatialnet_dist.checkpoint_weights import load_model

    per_worker = math.ceil(cfg.eval.max_samples / workers) if cfg.eval.max_samples else 0

    @ray.remote(num_cpus=1)
    def share(rank: int) -> SplitPredictions:
        model, _, vocabs = load_model(checkpoint)
        return predict_split(model, cfg, vocabs, split, rank, workers, per_worker)

    from spatialnet_dist.ray_cluster import connect_ray

    started = connect_ray(workers, cfg.train.use_gpu)  # as training does: RAY_ADDRESS, else a local instance; AWS settings to workers
    try:
        parts = ray.get([share.remote(r) for r in range(workers)])
        return _merge([p.rows for p in parts], parts[0].images)
    finally:
        if started:
            ray.shutdown()


def _absolute(url: str) -> str:
    return url if storage.is_s3(url) else str(Path(url).resolve())


def evaluate_checkpoint(
    checkpoint: str, data: str, split: str = "test", out: str | None = None, workers: int = 0, max_samples: int = 0
) -> dict:
    """`spatialnet eval run`: a checkpoint or bundle on every sample of `split` of the store at `data`.

    Writes to `out` (default <checkpoint>/eval-<split>); the run's metrics.jsonl, beside a checkpoint
    in its run directory, feeds the report's loss curves. -> the metrics.
    """
    from spatialnet_dist.checkpoint_weights import load_model

    checkpoint, data = _absolute(checkpoint.rstrip("/")), _absolute(data)
    model, cfg, vocabs = load_model(checkpoint)
    cfg.data.root = data
    cfg.eval.max_samples = max_samples or cfg.eval.max_samples
    if workers > 0:
        pred = _predict_with_ray(checkpoint, cfg, split, workers)
    else:
        mine = predict_split(model, cfg, vocabs, split, 0, 1, cfg.eval.max_samples)
        pred = _merge([mine.rows], mine.images)
    run_dir = checkpoint.rsplit("/", 1)[0]
    title = f"{checkpoint.rsplit('/', 1)[-1]}: evaluation on the {split} split of {data}"
    return finish(
        pred,
        cfg,
        vocabs,
        out or storage.join(checkpoint, f"eval-{split}"),
        storage.join(run_dir, "metrics.jsonl"),
        title,
    )
