"""Loaders: multi-task training batches (endless), per-task evaluation sub-batches (finite), and one labelled
corpus's images with their class ids whatever the tasks (finite: the kNN monitor's, evaluate/knn.py).

Training: the loader yields one multi-task micro-batch at a time (batch_format.micro_batch): {"images": the
distinct images of its rows, "captioning": sub-batch, "vqa": sub-batch, ...}. Every
enabled task has a sub-batch of `tasks.<task>.batch_size` rows each micro-batch, or, with
`train.mode: alternate`, only the task of that micro-batch index (data/order.py): the same on
every rank. Micro-batch m of rank r holds the task's global rows that data/order.py gives it, so
the batches are a function of (seed, m, rank) only: the same for any number of loader workers,
and their union over ranks the same for any number of ranks. The training order is a seeded
permutation per epoch of each task's samples, not a resampling with replacement. A task with mixup or
cutmix has its sub-batch mixed after collate (data/mixing.py), drawn from (seed, its stream, m, rank).

Statistics travel beside the batches: each loader worker gives (batch, {"skipped": {task: n}}),
the samples it replaced as bad input while making that batch, and `TrainLoader.skipped` sums them.
A stream's position is the number of micro-batches done (`TrainLoader.position()`, saved in the
checkpoint's meta.json); `make_train_loader(..., start=m)` resumes there with nothing to replay.

Whole batches are assembled inside the loader workers (a DataLoader with batch_size=None over an
IterableDataset): worker w of L makes micro-batches start + w, start + w + L, ..., and the
DataLoader returns them in that order. A `UserError` raised in a worker (a missing shard, too many
bad samples) travels to the main process as a value and is raised there unchanged, keeping its
one-line message.

A pre-emption may signal every process of a training worker at once: a loader process ignores a SIGTERM
that does not come from the process that started it and leaves it to that one (train/preemption.py
checkpoints at the next step; the batches keep coming meanwhile). The parent's own SIGTERM (DataLoader's
and multiprocessing's terminate() of a worker that does not stop) ends it, as torch's handler does.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Iterator
from itertools import islice

import torch
from torch.utils.data import DataLoader, IterableDataset

from spatialnet_dist.batch_format import collate, micro_batch
from spatialnet_dist.data.indexed import ShardReader
from spatialnet_dist.data.mixing import MixSettings, mix_rng, mix_settings, mix_sub_batch
from spatialnet_dist.data.order import alternate_task, batches_before, rank_rows
from spatialnet_dist.data.streams import (
    ImageCache,
    Shard,
    StreamCounts,
    TaskStreamSpec,
    decode_one,
    eval_stream,
    read_shards,
    split_shards,
    task_stream_spec,
)
from spatialnet_dist.data.train_rows import TaskRows
from spatialnet_dist.data.transforms import BandNorm, ImageTransform, model_image_size, task_transform
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.band_stats import from_manifest
from spatialnet_dist.store.manifest import TRAIN_SPLIT, read_manifest, shard_urls
from spatialnet_dist.text import TextVocabs

_ERROR_KEY = "__error__"


def _worker() -> tuple[int, int]:
    """(this loader worker's id, number of loader workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _raise_carried(item):
    if isinstance(item, dict) and _ERROR_KEY in item:
        raise item[_ERROR_KEY]
    return item


class MultiTaskBatches(IterableDataset):
    """Endless multi-task micro-batches of one rank from `start` on; each loader worker makes every L-th."""

    def __init__(self, specs: dict[str, TaskStreamSpec], batch_sizes: dict[str, int], seed: int, rank: int,
                 world_size: int, start: int, alternate: bool, image_cache_bytes: int, cache_dir: str,
                 mixing: dict[str, MixSettings]):
        self.specs, self.batch_sizes, self.seed, self.alternate = specs, batch_sizes, seed, alternate
        self.mixing = mixing  # the tasks whose sub-batches are mixed (data/mixing.py), and how
        self.rank, self.world_size, self.start = rank, world_size, start
        self.image_cache_bytes, self.cache_dir = image_cache_bytes, cache_dir

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        try:
            yield from self._batches(*_worker())
        except UserError as e:
            yield {_ERROR_KEY: e}

    def rows_before(self, index: int) -> dict[str, int]:
        """Global rows of each task (all ranks) in micro-batches 0 .. index-1: where micro-batch `index` begins."""
        before = batches_before(self.seed, index, list(self.specs), self.alternate)
        return {t: n * self.batch_sizes[t] * self.world_size for t, n in before.items()}

    def _batches(self, worker: int, workers: int) -> Iterator[tuple[dict, dict]]:
        tasks = list(self.specs)
        reader = ShardReader(self.cache_dir)
        images = ImageCache(self.image_cache_bytes)  # one per loader worker, shared by its task streams
        rows = {t: TaskRows(spec, self.seed, reader, images) for t, spec in self.specs.items()}
        try:
            for index in range(self.start + worker, 2**63, workers):
                chosen = [alternate_task(self.seed, index, tasks)] if self.alternate else tasks
                start, skipped = self.rows_before(index), {t: rows[t].counts.skipped for t in tasks}
                made: dict = {}  # the micro-batch's images by image key: its tasks' rows show the same ones
                batch = micro_batch({t: self._sub_batch(t, rows[t], index, start[t], made) for t in chosen})
                yield batch, {"skipped": {t: rows[t].counts.skipped - skipped[t] for t in tasks}}
        finally:
            reader.close()

    def _sub_batch(self, task: str, rows: TaskRows, index: int, start: int, made: dict) -> dict:
        """The task's sub-batch of micro-batch `index`, whose global rows begin at `start`, its images still the
        rows' (micro_batch stacks the distinct ones once); mixed, and so stacked, when the task mixes."""
        settings = self.mixing.get(task)
        sub = collate([rows.row(g, made) for g in rank_rows(start, self.batch_sizes[task], self.rank)],
                      stack_images=settings is not None)
        if settings is None:
            return sub
        return mix_sub_batch(sub, task, settings, mix_rng(self.seed, rows.stream, index, self.rank))


class TrainLoader:
    """Endless iterator of one rank's multi-task micro-batches; `.position()` is what to checkpoint,
    `.skipped` the samples per task replaced as bad input since the loader started."""

    def __init__(self, dataset: MultiTaskBatches, **loader_kwargs):
        self.dataset, self._loader_kwargs = dataset, loader_kwargs
        self.skipped = dict.fromkeys(dataset.specs, 0)
        self._start()

    def _start(self) -> None:
        self.micro_batches = self.dataset.start  # done: the next one's index
        self._loader = DataLoader(self.dataset, batch_size=None, **self._loader_kwargs)
        # One DataLoader iterator per start (a second iter() would restart the streams), made now: making it
        # draws from torch's global RNG, which must not shift the dropout of whichever step comes first.
        self._batches = iter(self._loader)

    def restart_at(self, micro_batches: int) -> None:
        """Go on from micro-batch `micro_batches` (a checkpoint's position()["micro_batches"]); the workers restart."""
        self.close()
        self.dataset.start = micro_batches
        self._start()

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        try:
            batch, stats = _raise_carried(next(self._batches))
        except UserError:
            self.close()  # the streams are broken: free the workers now, not at garbage collection
            raise
        self.micro_batches += 1
        for task, n in stats["skipped"].items():
            self.skipped[task] += n
        return batch

    def position(self) -> dict:
        """{"seed", "micro_batches": done, "rows": {task: global rows done, all ranks}}: the same on every rank."""
        return {"seed": self.dataset.seed, "micro_batches": self.micro_batches,
                "rows": self.dataset.rows_before(self.micro_batches)}

    def close(self) -> None:
        """Stop the loader workers (they also stop when the loader is garbage collected)."""
        self._batches = self._loader = None


def _leave_sigterm_to_parent(parent: int, worker_id: int) -> None:
    """worker_init_fn: SIGTERM blocked in this loader process's threads (those it starts later inherit the mask) and
    taken by one thread of its own, which ends the process only when `parent` (the pid of the process iterating the
    loader) sent it. Python's handlers cannot tell the sender, and one that ignores the parent's too would hang the
    parent's exit: multiprocessing joins its daemonic children after terminating them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_parents_sigterm, args=(parent,), daemon=True, name="sigterm").start()


def _exit_on_parents_sigterm(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass  # a pre-emption's: the parent checkpoints, this process goes on loading
    os._exit(0)


def _loader_kwargs(cfg, persistent: bool) -> dict:
    workers = cfg.data.loader_workers
    kwargs = {"num_workers": workers, "pin_memory": cfg.train.use_gpu}
    if workers:
        kwargs.update(prefetch_factor=cfg.data.prefetch, persistent_workers=persistent,
                      worker_init_fn=functools.partial(_leave_sigterm_to_parent, os.getpid()))
    return kwargs


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")


def make_train_loader(cfg, vocabs: TextVocabs, rank: int, world_size: int, start: int = 0) -> TrainLoader:
    """Endless multi-task micro-batches for `rank`, from micro-batch `start` (a checkpoint's
    position()["micro_batches"]; m = step * optim.grad_accum + micro)."""
    _check_rank(rank, world_size)
    tasks = cfg.tasks.enabled()
    specs = {t: task_stream_spec(cfg, vocabs, t, TRAIN_SPLIT, task_transform(cfg, t, train=True), train=True)
             for t in tasks}
    dataset = MultiTaskBatches(
        specs,
        {t: getattr(cfg.tasks, t).batch_size for t in tasks},
        cfg.run.seed,
        rank,
        world_size,
        start,
        alternate=cfg.train.mode == "alternate",
        image_cache_bytes=cfg.data.image_cache_mb * 2**20,
        cache_dir=cfg.data.cache_dir,
        mixing={t: settings for t in tasks if (settings := mix_settings(cfg, t))},
    )
    return TrainLoader(dataset, **_loader_kwargs(cfg, persistent=True))


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


# ---- one labelled corpus, whatever the tasks ----


def shard_quotas(sizes: list[int], limit: int) -> list[int]:
    """How many of each shard's samples (`sizes`, manifest order) to read for `limit` in all (0: every one): each
    shard its share by size, rounded down, and one more to the first shards with room until the sum is `limit`."""
    total = sum(sizes)
    if not limit or limit >= total:
        return list(sizes)
    quotas = [limit * size // total for size in sizes]
    for i in [i for i, size in enumerate(sizes) if quotas[i] < size][: limit - sum(quotas)]:
        quotas[i] += 1
    return quotas


class LabelledImages(IterableDataset):
    """Sub-batches {"image" (B, C, S, S), "image_id" [B], "label" (B,) int64: the class's index in the corpus's
    manifest "classes"} of one rank's share of (shard, quota) pairs, the first `quota` samples of each shard, split
    by rank then by loader worker as evaluation splits shards; samples without a class are left out. Read as
    evaluation reads: no augmentation, any bad input an error naming the shard."""

    def __init__(self, shards: list[tuple[Shard, int]], classes: list[str], transform: ImageTransform,
                 band_norm: BandNorm | None, rank: int, world_size: int, batch_size: int):
        self.shards, self.transform, self.band_norm = shards, transform, band_norm
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def __iter__(self) -> Iterator[dict]:
        rows = self._rows(*_worker())
        try:
            while chunk := list(islice(rows, self.batch_size)):
                yield collate(chunk)
        except UserError as e:
            yield {_ERROR_KEY: e}

    def _rows(self, worker: int, workers: int) -> Iterator[dict]:
        counts = StreamCounts("eval.knn", max_bad_fraction=0.0, strict=True)  # strict: the first bad sample raises
        for shard, quota in split_shards(self.shards, self.rank, self.world_size, worker, workers):
            raws = read_shards([{"url": shard.url, "samples": shard.samples}], counts)
            # A whole shard is read to its end, so that one cut short is named.
            for raw in raws if quota == shard.samples else islice(raws, quota):
                sample = decode_one(raw, counts)  # not None: strict counts raise on an undecodable sample
                if sample.label_name in self.class_index:
                    yield {"image": self.transform(sample.image, band_norm=self.band_norm), "image_id": sample.image_id,
                           "label": self.class_index[sample.label_name]}


def make_labelled_loader(cfg, corpus: str, split: str, rank: int, world_size: int, limit: int,
                         batch_size: int) -> EvalLoader:
    """`corpus`'s images of `split` that have a class (LabelledImages), from at most `limit` of its samples over all
    ranks (0: every one), each shard giving its share (shard_quotas): the same images for any number of ranks and
    loader workers, spread over the split (conversion shuffles a split across its shards)."""
    _check_rank(rank, world_size)
    manifest = read_manifest(cfg.data.root, corpus)
    urls = shard_urls(cfg.data.root, corpus, split, manifest)  # StoreError naming the manifest when the split is absent
    sizes = [s["samples"] for s in manifest["splits"][split]["shards"]]
    shards = [(Shard(url, size), quota) for url, size, quota in zip(urls, sizes, shard_quotas(sizes, limit)) if quota]
    transform = ImageTransform(model_image_size(cfg.model), cfg.model.in_chans)  # evaluation's: no augmentation
    dataset = LabelledImages(shards, manifest.get("classes") or [], transform, from_manifest(manifest), rank,
                             world_size, batch_size)
    return EvalLoader(dataset, **_loader_kwargs(cfg, persistent=False))
