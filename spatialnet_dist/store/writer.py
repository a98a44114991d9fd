"""ShardWriter: Samples -> tar shards + manifest under `<root>/<corpus>/`, local or S3; its tasks run
in this process, in worker processes or as Ray tasks (`store.pool`).

Work: `write` checks a sample and adds it to a block; each full block goes to an encode task
(`encode_block`) that fits and encodes its images (the cost of a conversion), writes their tar chunks
to a spool file of its own and counts the block's captions, questions and words. The writer keeps
where each chunk lies (three integers per sample), in the order the samples were written.

Mixing (DESIGN.md: conversion shuffles records across shards with a seed recorded in the manifest):
sources are often sorted (UCM-captions by class), and a reader's shuffle buffer only mixes within a
few shards, so shards written in source order give near single-class batches. At the commit each
split is permuted with `numpy.random.default_rng(shuffle_seed)` over its samples in write order and
cut into `shard_counts` shards; each shard is a task (`sharding.cut_shard`) that copies its samples'
chunks out of the spools. Order, cut and bytes depend on the samples and the seed alone: any number
of workers, processes or Ray tasks, gives the shards (and sha256s) of one.

Spools lie where every task can read them: `<root>/<corpus>/.staging-<generation>/` (a local store;
S3 with Ray), or a local temp folder (S3 with this machine's processes).

Visibility and re-conversion (DESIGN.md, CONTRACT: shards): readers follow the manifest only. A
conversion names its shards with its own generation, `<split>/<corpus>-<split>-<generation>-000000.tar`,
so it never writes over the shards of the corpus it replaces; tasks write them straight to the store.
Then the manifest is replaced in one step (local: atomic rename; S3: one PUT), then every shard it does
not list (older generations, leftovers of killed runs) and every staging folder is deleted. A crash at
any step leaves the previous manifest over its complete shards, or the new one over its own. An
exception inside the `with` block removes what this conversion wrote and leaves the previous corpus.

One writer per corpus at a time: a successful commit deletes every shard and staging folder it does not list.

The per-split counts and the manifest document are store/split_counts.py; this file is the scheduling
(blocks, spools, shards, the commit), one story from `write` to `_remove_unlisted` (about 340 lines).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from array import array
from collections import defaultdict, deque
from contextlib import suppress

import numpy as np
from tqdm import tqdm

from spatialnet_dist.store import sharding, storage
from spatialnet_dist.store.manifest import manifest_url
from spatialnet_dist.store.pool import TaskPool
from spatialnet_dist.store.schema import (
    DEFAULT_QUALITY,
    Sample,
    SchemaError,
    as_hwc,
    check_image_format,
    check_image_id,
    encode_sample,
    fit_image,
    shard_name,
    validate_record,
)
from spatialnet_dist.store.split_counts import SplitCounts, corpus_manifest
from spatialnet_dist.store.storage import StoreError

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_STAGING = ".staging-"
# WebDataset's advice is 100 MB to 1 GB per shard: large sequential reads, few objects to list.
DEFAULT_SHARD_BYTES = 256 * 2**20
# Ranks x loader workers of a typical job (8 GPUs x 2 loader workers): every split has at least this
# many shards (or one per sample), so that evaluation, which splits a split's shards by rank and then
# by worker, keeps them all busy, and training draws from many mixed shards.
MIN_SHARDS = 16
# An encode task takes this many samples (enough to outweigh a task's overhead), or fewer holding this
# many image bytes (large rasters): the blocks in flight are what the writer holds in memory.
BLOCK_SAMPLES = 32
BLOCK_BYTES = 64 * 2**20
PENDING_BYTES = 1 << 30  # image bytes of the blocks in flight at most (a Ray cluster's CPUs could ask for more)


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StoreError(f"{kind} name {name!r}: use letters, digits, '_' and '-' only")
    return name


def _shard_re(corpus: str, generation: str = r"(?:[0-9a-f]{8}-)?") -> re.Pattern:
    """`<split>/<corpus>-<split>-[<generation>-]<index>.tar` relative to the corpus folder: a shard of any
    generation (the names before generations too), or of the one given."""
    return re.compile(rf"^([A-Za-z0-9_\-]+)/{re.escape(corpus)}-\1-{generation}\d{{6}}\.tar$")


def shard_counts(samples: int, tar_bytes: int, shard_bytes: int, min_shards: int, shard_size: int | None) -> list[int]:
    """Samples per shard of one split of `samples` samples taking `tar_bytes`: enough shards to hold about
    `shard_bytes` each, at least `min_shards` (or one per sample), at most `shard_size` samples each (None:
    no cap). Samples are spread evenly (shards differ by at most one): shuffled samples of one corpus
    have similar sizes, so bytes come out even too, and a reader that draws shards uniformly draws
    samples uniformly."""
    wanted = max(-(-tar_bytes // shard_bytes), min_shards, -(-samples // shard_size) if shard_size else 1)
    shards = min(wanted, samples)
    base, extra = divmod(samples, shards)
    return [base + 1] * extra + [base] * (shards - extra)



class _Locations:
    """Where a split's chunks lie, in write order: spool index, offset, length (three integers per sample)."""

    def __init__(self):
        self.spool, self.offset, self.length = array("q"), array("q"), array("q")
        self.bytes = 0

    def add(self, spool: int, offset: int, length: int) -> None:
        self.spool.append(spool)
        self.offset.append(offset)
        self.length.append(length)
        self.bytes += length

    def __len__(self) -> int:
        return len(self.spool)


def fit_sample(sample: Sample, image_size: tuple[int, int] | None) -> tuple[Sample, bool]:
    """-> (the sample with its image at `image_size` by FIT_RULE, whether it had another size)."""
    if image_size is None:
        return sample, False
    image = as_hwc(sample.image)
    if image.shape[:2] == tuple(image_size):
        return sample, False
    meta = {**sample.meta, "original_size": list(image.shape[:2])}
    return dataclasses.replace(sample, image=fit_image(image, image_size), meta=meta), True


def encode_block(
    samples: list[Sample], image_size: tuple[int, int] | None, image_format: str, quality: int, spool_url: str
) -> tuple[list[tuple[str, int, int]], dict[str, SplitCounts]]:
    """A conversion task: fit and encode a block of samples (`image_format` at `quality`: schema.encode_image),
    spool their tar chunks to `spool_url`. -> ([(split, offset, length)] in block order, {split: the block's counts})."""
    chunks, counts = [], {}
    for sample in samples:
        sample, resized = fit_sample(sample, image_size)
        chunks.append(sharding.tar_chunk(encode_sample(sample, image_format, quality)))
        part = counts.setdefault(sample.split, SplitCounts())
        part.add(sample)
        part.resized += resized
    offsets = sharding.write_spool(spool_url, chunks)
    return [(s.split, offset, len(c)) for s, offset, c in zip(samples, offsets, chunks)], counts


class ShardWriter:
    """Write one corpus. `with ShardWriter(root, "ucm", classes=[...]) as w: w.write(sample)`.

    Each split is shuffled with `shuffle_seed` and cut into `shard_counts(...)` shards: about
    `shard_bytes` each, at least `min_shards` (or one per sample), at most `shard_size` samples
    (None: no cap). `image_size` (H, W): the corpus's nominal size; an image of another size is
    fitted to it by `schema.FIT_RULE`, keeps its size in `meta["original_size"]` and is counted per
    split in the manifest (`"resized"`). `image_format` ("png", "jpeg", "webp") at `quality`: how 8-bit images
are stored (schema.IMAGE_FORMATS; the manifest's "image_format"). `tags_source`: where the tags came from when a table beside the
    corpus gave them (corpora.base.tags_source_note), the manifest's "tags_source". `workers` > 1: encode and shard in that many local processes;
    `use_ray`: as Ray tasks on the cluster (RAY_ADDRESS, else a local instance).
    """

    def __init__(
        self,
        root: str,
        corpus: str,
        source: str = "",
        classes: list[str] | None = None,
        shard_size: int | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        min_shards: int = MIN_SHARDS,
        shuffle_seed: int = 0,
        image_size: tuple[int, int] | None = None,
        tags_source: dict | None = None,
        image_format: str = "png",
        quality: int = DEFAULT_QUALITY,
        workers: int = 1,
        use_ray: bool = False,
    ):
        cap = 1 if shard_size is None else shard_size
        checked = (("shard_size", cap), ("shard_bytes", shard_bytes), ("min_shards", min_shards), ("workers", workers))
        for key, value in checked:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StoreError(f"{key} {value!r}: must be a positive integer")
        if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int) or shuffle_seed < 0:
            raise StoreError(f"shuffle_seed {shuffle_seed!r}: must be a non-negative integer")
        check_image_format(image_format, quality)
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise StoreError(f"image_size {image_size!r}: expected (height, width), both positive")
        self.root, self.corpus = str(root), _check_name("corpus", corpus)
        self.source, self.classes = source, list(classes) if classes is not None else None
        self.shard_size, self.shard_bytes, self.min_shards = shard_size, shard_bytes, min_shards
        self.shuffle_seed = shuffle_seed
        self.image_size = (int(image_size[0]), int(image_size[1])) if image_size is not None else None
        self.tags_source = tags_source
        self.image_format, self.quality = image_format, quality
        self.workers, self.use_ray = workers, use_ray
        self.generation = uuid.uuid4().hex[:8]  # this conversion's id, in its shard and staging names
        self.corpus_url = storage.join(self.root, corpus)
        self.staging_url = storage.join(self.corpus_url, f"{_STAGING}{self.generation}")
        self.splits: dict[str, SplitCounts] = {}
        self._image_ids: defaultdict[str, set[str]] = defaultdict(set)
        self._block: list[Sample] = []
        self._block_bytes = 0
        self._spools: list[str] = []  # spool URL of each encode task, by its index
        self._pending: deque = deque()  # (spool index, task, image bytes) of encode tasks not collected, oldest first
        self._locations: dict[str, _Locations] = {}
        self._pool: TaskPool | None = None
        self._temp_spools: str | None = None
        self._progress = None

    def __enter__(self) -> ShardWriter:
        self._pool = TaskPool(self.workers, self.use_ray)
        if storage.is_s3(self.corpus_url) and not self.use_ray:
            # This machine's processes spool on its disk; Ray tasks on other nodes read spools from the store.
            self._temp_spools = tempfile.mkdtemp(prefix="spatialnet-spool-")
        self._progress = tqdm(desc=f"converting {self.corpus}", unit=" img", file=sys.stderr, disable=None)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
            else:
                self._abort()
        finally:
            self._progress.close()
            self._pool.close()
            if self._temp_spools is not None:
                shutil.rmtree(self._temp_spools, ignore_errors=True)

    def write(self, sample: Sample) -> None:
        """Add one sample. A rejected sample (SchemaError/StoreError) leaves no trace: the caller may skip it."""
        if self._progress is None:
            raise RuntimeError("ShardWriter.write outside its `with` block: nothing would be committed")
        if sample.corpus != self.corpus:
            raise SchemaError(f"sample {sample.image_id}: corpus {sample.corpus!r}, writer's is {self.corpus!r}")
        split = _check_name("split", sample.split)
        if self.classes is not None and sample.label is not None and not 0 <= sample.label < len(self.classes):
            raise SchemaError(f"sample {sample.image_id}: label {sample.label} outside the {len(self.classes)} classes")
        if sample.image_id in self._image_ids[split]:
            # Two samples with one key in a split would be read back as one.
            raise SchemaError(f"sample {sample.image_id}: duplicate image_id in split {split!r}")
        # What encode_block would refuse, refused here: a task's failure ends the conversion.
        check_image_id(sample.image_id)
        validate_record(sample.record())
        image = as_hwc(sample.image)
        if min(image.shape[:2]) < 1:
            raise SchemaError(f"sample {sample.image_id}: empty image of shape {image.shape}")
        self._image_ids[split].add(sample.image_id)
        self._block.append(sample)
        self._block_bytes += image.nbytes
        if len(self._block) >= BLOCK_SAMPLES or self._block_bytes >= BLOCK_BYTES:
            self._submit_block()

    def _submit_block(self) -> None:
        index = len(self._spools)
        spool_folder = self._temp_spools or self.staging_url
        self._spools.append(storage.join(spool_folder, f"block-{index:06d}.bin"))
        task = self._pool.submit(encode_block, self._block, self.image_size, self.image_format, self.quality,
                                 self._spools[index])
        self._pending.append((index, task, self._block_bytes))
        self._block, self._block_bytes = [], 0
        # Blocks in flight are held in memory: two per task that can run at once, within PENDING_BYTES.
        while len(self._pending) > 2 * self._pool.capacity or sum(p[2] for p in self._pending) > PENDING_BYTES:
            self._collect()

    def _collect(self) -> None:
        """Take the oldest encode task's result: where its chunks lie, and its counts."""
        index, task, _ = self._pending.popleft()
        entries, counts = self._pool.result(task)
        for split, offset, length in entries:
            self._locations.setdefault(split, _Locations()).add(index, offset, length)
        for split, part in counts.items():
            self.splits.setdefault(split, SplitCounts()).merge(part)
        self._progress.update(len(entries))

    def manifest(self) -> dict:
        return corpus_manifest(self.corpus, self.source, self.classes, self.tags_source, self.shuffle_seed,
                               self.image_size, self.splits, self.image_format, self.quality)

    def _commit(self) -> None:
        try:
            if self._block:
                self._submit_block()
            while self._pending:
                self._collect()
            if not self.splits:
                raise StoreError(f"{self.corpus_url}: no samples written; the corpus is left as it was")
            self._write_shards()
            manifest = json.dumps(self.manifest(), indent=1).encode()
            storage.write_bytes_atomic(manifest_url(self.root, self.corpus), manifest)  # the swap
        except BaseException:
            self._abort()
            raise
        self._remove_unlisted()

    def _write_shards(self) -> None:
        """Permute each split, cut it into shards, and run one task per shard."""
        tasks = []
        for split in sorted(self._locations):
            where = self._locations[split]
            order = np.random.default_rng(self.shuffle_seed).permutation(len(where))
            start = 0
            for index, n in enumerate(
                shard_counts(len(where), where.bytes, self.shard_bytes, self.min_shards, self.shard_size)
            ):
                rows = order[start : start + n]
                start += n
                used = sorted({where.spool[i] for i in rows})  # the spools this shard reads, renumbered
                number = {spool: k for k, spool in enumerate(used)}
                pieces = [(number[where.spool[i]], where.offset[i], where.length[i]) for i in rows]
                name = shard_name(self.corpus, split, self.generation, index)
                url = storage.join(self.corpus_url, split, name)
                spools = [self._spools[spool] for spool in used]
                tasks.append((split, n, self._pool.submit(sharding.cut_shard, url, name, spools, pieces)))
        total = sum(n for _, n, _ in tasks)
        with tqdm(desc=f"sharding {self.corpus}", unit=" img", total=total, file=sys.stderr, disable=None) as bar:
            for split, n, task in tasks:
                self.splits[split].shards.append(self._pool.result(task))
                bar.update(n)

    def _remove_unlisted(self) -> None:
        """Delete the shards the new manifest does not list (older generations, leftovers of killed
        runs) and every staging folder."""
        listed = {f"{split}/{shard['name']}" for split, counts in self.splits.items() for shard in counts.shards}
        any_shard, staging = _shard_re(self.corpus), set()
        for rel in storage.list_files(self.corpus_url):
            if rel.startswith(_STAGING):
                staging.add(rel.split("/")[0])
            elif any_shard.match(rel) and rel not in listed:
                storage.delete(storage.join(self.corpus_url, rel))
        for folder in sorted(staging):
            storage.delete_prefix(storage.join(self.corpus_url, folder))
        if not storage.is_s3(self.corpus_url):  # empty local folders of splits that no longer exist
            for split in os.listdir(self.corpus_url):
                with suppress(OSError):
                    os.rmdir(os.path.join(self.corpus_url, split))

    def _abort(self) -> None:
        """Delete what this conversion wrote: its staging folder and its shards, after its tasks stopped.
        Best effort: the exception that brought us here matters more than a failed cleanup, and the
        next successful conversion of this corpus deletes a leftover."""
        self._pool.close()
        self._pending.clear()
        with suppress(StoreError):
            storage.delete_prefix(self.staging_url)
            own = _shard_re(self.corpus, f"{self.generation}-")
            for rel in storage.list_files(self.corpus_url):
                if own.match(rel):
                    storage.delete(storage.join(self.corpus_url, rel))
