"""Loaders: multi-task training batches (endless) and per-task evaluation sub-batches (finite).

Training batch, one per step (sub-batches as in data/batch_format.py "Batch format"):
    {"captioning": sub-batch, "vqa": sub-batch, ..., "stats": {"skipped": {task: n, ...}}}
Every enabled task has a sub-batch of `tasks.<task>.batch_size` rows each step, or, with
`train.mode: alternate`, only the task drawn for that batch index from an RNG seeded by
(run seed, batch index): the same draw on every rank. "stats" carries, per enabled task, the
samples that the loader worker producing this batch skipped as bad input since its previous
batch: summing them over batches gives the total even with several loader workers. The trainer
pops it (`batch.pop("stats")`) before the batch reaches the model and reports it as metrics.

Whole batches are assembled inside the loader workers (a DataLoader with batch_size=None over an
IterableDataset), so worker w of W makes the batches of indices start + w, start + w + W, ...;
the DataLoader returns them in that order, so batches are deterministic for a seed and a
worker count. A `UserError` raised in a worker (a missing shard, too many bad samples) travels to
the main process as a value and is raised there unchanged, keeping its one-line message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
from torch.utils.data import DataLoader, IterableDataset

from spatialnet_dist.data.batch_format import collate, question_count
from spatialnet_dist.data.streams import (
    ImageCache,
    StreamCounts,
    TaskStreamSpec,
    eval_stream,
    split_shards,
    task_stream_spec,
    train_stream,
)
from spatialnet_dist.data.transforms import task_transform
from spatialnet_dist.data.vocab import TRAIN_SPLIT
from spatialnet_dist.errors import UserError
from spatialnet_dist.text import TextVocabs

STATS_KEY = "stats"
_ERROR_KEY = "__error__"


def stream_seed(*parts) -> int:
    """A 64-bit seed from any tuple of ints and strings, identical in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def alternate_task(seed: int, index: int, tasks: list[str]) -> str:
    """The task of batch `index` in alternate mode: a function of (seed, index) only, so every rank agrees."""
    return tasks[random.Random(stream_seed(seed, index)).randrange(len(tasks))]


def _worker() -> tuple[int, int]:
    """(this loader worker's id, number of loader workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _raise_carried(item: dict) -> dict:
    if _ERROR_KEY in item:
        raise item[_ERROR_KEY]
    return item


@dataclass
class StreamState:
    """What the training streams of one rank have delivered; saved in checkpoints as a dict.

    A resumed run does not replay samples: it draws from streams seeded with a seed_offset that no
    earlier segment of the run used (`used_offsets` records them all), and it continues the batch
    index (`batches`) so alternate mode picks the same tasks it would have without the restart.
    """

    seed: int
    seed_offset: int = 0
    used_offsets: list[int] = field(default_factory=list)
    batches: int = 0  # batches delivered = the next batch's index
    samples_seen: dict[str, int] = field(default_factory=dict)  # rows (images) per task, this rank
    questions_seen: dict[str, int] = field(default_factory=dict)  # questions per vqa/regression task, this rank
    skipped: dict[str, int] = field(default_factory=dict)  # bad-input samples per task, this rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls(**d)

    def resumed(self, seed_offset: int) -> StreamState:
        """The state of the next segment of the run: `seed_offset`, or the next unused one if it was used."""
        offset = seed_offset if seed_offset not in self.used_offsets else max(self.used_offsets) + 1
        state = StreamState.from_dict(self.to_dict())  # a deep copy: the counters go on from here
        state.seed_offset, state.used_offsets = offset, [*self.used_offsets, offset]
        return state

    def record(self, batch: dict) -> None:
        self.batches += 1
        for task, sub in batch.items():
            if task != STATS_KEY:
                self.samples_seen[task] = self.samples_seen.get(task, 0) + len(sub["image_id"])
                if questions := question_count(sub):
                    self.questions_seen[task] = self.questions_seen.get(task, 0) + questions
        for task, n in batch[STATS_KEY]["skipped"].items():
            self.skipped[task] = self.skipped.get(task, 0) + n


class MultiTaskBatches(IterableDataset):
    """Endless multi-task batches of one rank; each loader worker runs its own seeded task streams."""

    def __init__(self, specs: dict[str, TaskStreamSpec], batch_sizes: dict[str, int], seed: int, rank: int,
                 seed_offset: int, start: int, alternate: bool, image_cache_bytes: int):
        self.specs, self.batch_sizes = specs, batch_sizes
        self.seed, self.rank, self.seed_offset, self.start, self.alternate = seed, rank, seed_offset, start, alternate
        self.image_cache_bytes = image_cache_bytes

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._batches(*_worker())
        except UserError as e:
            yield {_ERROR_KEY: e}

    def _batches(self, worker: int, workers: int) -> Iterator[dict]:
        tasks = list(self.specs)
        counts = {t: StreamCounts(t, spec.max_bad_fraction) for t, spec in self.specs.items()}
        images = ImageCache(self.image_cache_bytes)  # one per loader worker, shared by its task streams
        streams = {
            t: iter(train_stream(spec, stream_seed(self.seed, self.rank, worker, self.seed_offset, t), counts[t],
                                 images))
            for t, spec in self.specs.items()
        }
        reported = dict.fromkeys(tasks, 0)
        for index in range(self.start + worker, 2**63, workers):
            chosen = [alternate_task(self.seed, index, tasks)] if self.alternate else tasks
            batch = {t: collate([next(streams[t]) for _ in range(self.batch_sizes[t])]) for t in chosen}
            batch[STATS_KEY] = {"skipped": {t: counts[t].skipped - reported[t] for t in tasks}}
            reported = {t: counts[t].skipped for t in tasks}
            yield batch


class TrainLoader:
    """Endless iterator of multi-task batches of one rank; `.state` is what to checkpoint."""

    def __init__(self, dataset: MultiTaskBatches, state: StreamState, **loader_kwargs):
        self.state = state
        self._loader = DataLoader(dataset, batch_size=None, **loader_kwargs)
        self._batches = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        # One DataLoader iterator for the loader's life: a second iter() would restart the streams.
        if self._batches is None:
            self._batches = iter(self._loader)
        try:
            batch = _raise_carried(next(self._batches))
        except UserError:
            self.close()  # the streams are broken: free the workers now, not at garbage collection
            raise
        self.state.record(batch)
        return batch

    def close(self) -> None:
        """Stop the loader workers (they also stop when the loader is garbage collected)."""
        self._batches = self._loader = None


def _loader_kwargs(cfg, persistent: bool) -> dict:
    workers = cfg.data.loader_workers
    kwargs = {"num_workers": workers, "pin_memory": cfg.train.use_gpu}
    if workers:
        kwargs.update(prefetch_factor=cfg.data.prefetch, persistent_workers=persistent)
    return kwargs


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")


def make_train_loader(cfg, vocabs: TextVocabs, rank: int, world_size: int, seed_offset: int = 0,
                      state: StreamState | None = None) -> TrainLoader:
    """Endless multi-task batches for `rank`. `seed_offset`: the restart counter (any value no earlier
    segment used); `state`: a checkpoint's `StreamState` to continue from (its seed and counts)."""
    _check_rank(rank, world_size)
    tasks = cfg.tasks.enabled()
    specs = {t: task_stream_spec(cfg, vocabs, t, TRAIN_SPLIT, task_transform(cfg, t, train=True), train=True)
             for t in tasks}
    if state is None:
        state = StreamState(seed=cfg.run.seed, seed_offset=seed_offset, used_offsets=[seed_offset])
    else:
        state = state.resumed(seed_offset)
    dataset = MultiTaskBatches(
        specs,
        {t: getattr(cfg.tasks, t).batch_size for t in tasks},
        state.seed,
        rank,
        state.seed_offset,
        state.batches,
        alternate=cfg.train.mode == "alternate",
        image_cache_bytes=cfg.data.image_cache_mb * 2**20,
    )
    return TrainLoader(dataset, state, **_loader_kwargs(cfg, persistent=True))


class EvalBatches(IterableDataset):
    """One task's sub-batches of one rank's share of a split: shards split by rank, then by loader worker."""

    def __init__(self, spec: TaskStreamSpec, rank: int, world_size: int, batch_size: int):
        self.spec, self.rank, self.world_size, self.batch_size = spec, rank, world_size, batch_size

    def __iter__(self) -> Iterator[dict]:
        shards = split_shards(self.spec.shards(), self.rank, self.world_size, *_worker())
        counts = StreamCounts(self.spec.task, self.spec.max_bad_fraction, strict=True)
        rows = iter(eval_stream(self.spec, shards, counts))
        try:
            while chunk := list(islice(rows, self.batch_size)):
                yield collate(chunk)
        except UserError as e:
            yield {_ERROR_KEY: e}


class EvalLoader:
    """Finite, re-iterable sub-batches of one task (the last one may be short)."""

    def __init__(self, dataset: EvalBatches, **loader_kwargs):
        self._loader = DataLoader(dataset, batch_size=None, **loader_kwargs)

    def __iter__(self) -> Iterator[dict]:
        for sub_batch in self._loader:
            yield _raise_carried(sub_batch)


def make_eval_loader(cfg, vocabs: TextVocabs, task: str, split: str, rank: int, world_size: int,
                     batch_size: int | None = None) -> EvalLoader:
    """Every sample of `split` for `task`, each exactly once across ranks (a rank whose share of
    the shards is empty gets no batches). One row per image: vqa and regression with all its
    questions, captioning with "references". Bad input raises, naming the shard."""
    _check_rank(rank, world_size)
    spec = task_stream_spec(cfg, vocabs, task, split, task_transform(cfg, task, train=False), train=False)
    dataset = EvalBatches(spec, rank, world_size, batch_size or getattr(cfg.tasks, task).batch_size)
    return EvalLoader(dataset, **_loader_kwargs(cfg, persistent=False))
