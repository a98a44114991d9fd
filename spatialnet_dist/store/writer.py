"""ShardWriter: Samples -> tar shards + manifest under `<root>/<corpus>/`, local or S3.

Mixing (DESIGN.md: conversion shuffles records across shards with a seed recorded in the manifest):
sources are often sorted (UCM-captions by class), and a reader's shuffle buffer only mixes within a
few shards, so shards written in source order give near single-class batches. `write` encodes each
sample into its tar bytes and appends them to a spool file of its split (memory: two integers per
sample); the commit permutes each split with `numpy.random.default_rng(shuffle_seed)` and copies the
samples into the shards in that order. The shard count is known then: see `shard_counts`.

Visibility (DESIGN.md, CONTRACT: shards): a reader only ever follows the manifest. Shards are first
written to a staging folder `<root>/<corpus>/.staging-<token>/` (S3: spooled to a local temp file,
then uploaded there). Only when the `with` block ends without an exception are they moved to their
final names (local: atomic rename; S3: server-side copy), then the manifest is written, then every
shard the new manifest does not list is removed. An exception inside the block removes the staging
folder and leaves the previous corpus (manifest and shards) untouched.

One writer per corpus at a time: a successful commit also removes staging folders left by killed runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import tarfile
import tempfile
import uuid
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import suppress
from datetime import datetime, timezone

import numpy as np
from tqdm import tqdm

from spatialnet_dist.store import storage
from spatialnet_dist.store.band_stats import BandStats
from spatialnet_dist.store.manifest import manifest_url
from spatialnet_dist.store.schema import (
    FIT_RULE,
    SCHEMA_VERSION,
    Sample,
    SchemaError,
    as_hwc,
    encode_sample,
    fit_image,
    shard_name,
)
from spatialnet_dist.store.storage import StoreError
from spatialnet_dist.text import words

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_STAGING = ".staging-"
_BLOCK = 512  # tar header and data block size
# WebDataset's advice is 100 MB to 1 GB per shard: large sequential reads, few objects to list.
DEFAULT_SHARD_BYTES = 256 * 2**20
# Ranks x loader workers of a typical job (8 GPUs x 2 loader workers): every split has at least this
# many shards (or one per sample), so that evaluation, which splits a split's shards by rank and then
# by worker, keeps them all busy, and training draws from many mixed shards.
MIN_SHARDS = 16


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StoreError(f"{kind} name {name!r}: use letters, digits, '_' and '-' only")
    return name


def _padded(tar_bytes: int) -> int:
    """File size of a tar whose blocks (end blocks included) take `tar_bytes`: tarfile pads to whole records."""
    return -(-tar_bytes // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _tar_chunk(members: dict[str, bytes]) -> bytes:
    """One sample as it lies in a tar: per member (extensions sorted) a header block, then its data padded to blocks."""
    key = members["__key__"]
    parts = []
    for ext in sorted(k for k in members if k != "__key__"):
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        # Fixed metadata: the same samples and seed give byte-identical shards (and sha256s) on every run.
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
        parts += [info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), data, bytes(-len(data) % _BLOCK)]
    return b"".join(parts)


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


class _Spool:
    """One split's samples as tar chunks, appended to a local file in arrival order and read back in
    any order. Memory: two integers per sample."""

    def __init__(self, folder: str | None):
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix="spatialnet-spool-", suffix=".bin", dir=folder)
        self.file = os.fdopen(fd, "w+b")
        self.offsets, self.lengths = array("q"), array("q")
        self.bytes = 0

    def append(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.offsets.append(self.bytes)
        self.lengths.append(len(chunk))
        self.bytes += len(chunk)

    def chunks(self, order) -> Iterator[bytes]:
        """The chunks of the samples at the positions `order`, in that order."""
        self.file.flush()
        fd = self.file.fileno()
        for i in order:
            yield os.pread(fd, self.lengths[i], self.offsets[i])

    def discard(self) -> None:
        self.file.close()
        with suppress(OSError):
            os.remove(self.path)


def _write_shard(url: str, name: str, chunks: Iterable[bytes]) -> dict:
    """One tar of sample chunks, ended as tarfile ends one (two zero blocks, padded to whole records);
    a shard for S3 is spooled to a local temp file and uploaded. -> the manifest's shard entry."""
    s3 = storage.is_s3(url)
    if s3:
        fd, path = tempfile.mkstemp(prefix="spatialnet-shard-", suffix=".tar")
        file = os.fdopen(fd, "wb")
    else:
        os.makedirs(os.path.dirname(url), exist_ok=True)
        path, file = url, open(url, "wb")
    sha256, size, samples = hashlib.sha256(), 0, 0
    try:
        with file:
            for chunk in chunks:
                file.write(chunk)
                sha256.update(chunk)
                size, samples = size + len(chunk), samples + 1
            end = bytes(_padded(size + 2 * _BLOCK) - size)
            file.write(end)
            sha256.update(end)
            size += len(end)
        if s3:
            storage.put_file(path, url)
    finally:
        if s3:
            with suppress(OSError):
                os.remove(path)
    return {"name": name, "samples": samples, "bytes": size, "sha256": sha256.hexdigest()}


class _SplitCounts:
    def __init__(self):
        self.samples = self.captions = self.questions = self.resized = 0
        self.questions_by_type: Counter = Counter()
        self.word_counts: Counter = Counter()
        self.answer_counts: defaultdict[str, Counter] = defaultdict(Counter)
        self.shards: list[dict] = []
        self.image_ids: set[str] = set()
        self.band_stats = BandStats()  # partial sums: parallel writers merge them

    def add(self, sample: Sample) -> None:
        self.band_stats.add(sample.image)
        self.samples += 1
        self.captions += len(sample.captions)
        self.questions += len(sample.qa)
        for caption in sample.captions:
            self.word_counts.update(words(caption))
        for q in sample.qa:
            self.questions_by_type[q["type"]] += 1
            self.word_counts.update(words(q["question"]))
            self.answer_counts[q["type"]][str(q["answer"])] += 1

    def manifest(self, fit_rule: str | None) -> dict:
        def by_count(counter: Counter) -> dict:
            return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

        resized = {"resized": {"rule": fit_rule, "count": self.resized}} if fit_rule else {}
        return {
            "samples": self.samples,
            "captions": self.captions,
            "questions": self.questions,
            "questions_by_type": dict(sorted(self.questions_by_type.items())),
            **resized,
            **self.band_stats.manifest(),
            "shards": self.shards,
            "word_counts": by_count(self.word_counts),
            "answer_counts": {qtype: by_count(c) for qtype, c in sorted(self.answer_counts.items())},
        }


class ShardWriter:
    """Write one corpus. `with ShardWriter(root, "ucm", classes=[...]) as w: w.write(sample)`.

    Each split is shuffled with `shuffle_seed` and cut into `shard_counts(...)` shards: about
    `shard_bytes` each, at least `min_shards` (or one per sample), at most `shard_size` samples
    (None: no cap). `image_size` (H, W): the corpus's nominal size; an image of another size is
    fitted to it by `schema.FIT_RULE`, keeps its size in `meta["original_size"]` and is counted per
    split in the manifest (`"resized"`).
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
    ):
        cap = 1 if shard_size is None else shard_size
        for key, value in (("shard_size", cap), ("shard_bytes", shard_bytes), ("min_shards", min_shards)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StoreError(f"{key} {value!r}: must be a positive integer")
        if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int) or shuffle_seed < 0:
            raise StoreError(f"shuffle_seed {shuffle_seed!r}: must be a non-negative integer")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise StoreError(f"image_size {image_size!r}: expected (height, width), both positive")
        self.root, self.corpus = str(root), _check_name("corpus", corpus)
        self.source, self.classes = source, list(classes) if classes is not None else None
        self.shard_size, self.shard_bytes, self.min_shards = shard_size, shard_bytes, min_shards
        self.shuffle_seed = shuffle_seed
        self.image_size = (int(image_size[0]), int(image_size[1])) if image_size is not None else None
        self.corpus_url = storage.join(self.root, corpus)
        self.staging_url = storage.join(self.corpus_url, f"{_STAGING}{uuid.uuid4().hex[:12]}")
        self.splits: dict[str, _SplitCounts] = {}
        self._spools: dict[str, _Spool] = {}
        self._progress = None

    def __enter__(self) -> ShardWriter:
        self._progress = tqdm(desc=f"reading {self.corpus}", unit=" img", file=sys.stderr, disable=None)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._progress.close()
        if exc_type is None:
            self._commit()
        else:
            self._abort()

    def write(self, sample: Sample) -> None:
        """Add one sample. A rejected sample (SchemaError/StoreError) leaves no trace: the caller may skip it."""
        if self._progress is None:
            raise RuntimeError("ShardWriter.write outside its `with` block: nothing would be committed")
        if sample.corpus != self.corpus:
            raise SchemaError(f"sample {sample.image_id}: corpus {sample.corpus!r}, writer's is {self.corpus!r}")
        split = _check_name("split", sample.split)
        if self.classes is not None and sample.label is not None and not 0 <= sample.label < len(self.classes):
            raise SchemaError(f"sample {sample.image_id}: label {sample.label} outside the {len(self.classes)} classes")
        if split in self.splits and sample.image_id in self.splits[split].image_ids:
            # Two samples with one key in a split would be read back as one.
            raise SchemaError(f"sample {sample.image_id}: duplicate image_id in split {split!r}")
        sample, resized = self._fit(sample)
        chunk = _tar_chunk(encode_sample(sample))
        if split not in self._spools:
            # Local stores spool in the staging folder (the disk that takes the shards), S3 stores in the temp folder.
            self._spools[split] = _Spool(None if storage.is_s3(self.staging_url) else self.staging_url)
        self._spools[split].append(chunk)
        counts = self.splits.setdefault(split, _SplitCounts())
        counts.image_ids.add(sample.image_id)
        counts.add(sample)
        counts.resized += resized
        self._progress.update(1)

    def _fit(self, sample: Sample) -> tuple[Sample, bool]:
        """-> (the sample with its image at `image_size`, whether it had another size)."""
        if self.image_size is None:
            return sample, False
        image = as_hwc(sample.image)
        if image.shape[:2] == self.image_size:
            return sample, False
        meta = {**sample.meta, "original_size": list(image.shape[:2])}
        return dataclasses.replace(sample, image=fit_image(image, self.image_size), meta=meta), True

    def manifest(self) -> dict:
        fit_rule = FIT_RULE if self.image_size is not None else None
        return {
            "schema_version": SCHEMA_VERSION,
            "corpus": self.corpus,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": self.source,
            "classes": self.classes,
            "shuffle_seed": self.shuffle_seed,
            "image_size": list(self.image_size) if self.image_size is not None else None,
            "splits": {split: counts.manifest(fit_rule) for split, counts in sorted(self.splits.items())},
        }

    def _commit(self) -> None:
        if not self.splits:
            self._abort()
            raise StoreError(f"{self.corpus_url}: no samples written; the corpus is left as it was")
        listed = set()
        try:
            total = sum(counts.samples for counts in self.splits.values())
            with tqdm(
                desc=f"sharding {self.corpus}", unit=" img", total=total, file=sys.stderr, disable=None
            ) as progress:
                for split in sorted(self.splits):
                    self.splits[split].shards = self._write_split(split, self._spools.pop(split), progress)
            for split, counts in self.splits.items():
                for shard in counts.shards:
                    rel = f"{split}/{shard['name']}"
                    storage.move(storage.join(self.staging_url, rel), storage.join(self.corpus_url, rel))
                    listed.add(rel)
            manifest = json.dumps(self.manifest(), indent=1).encode()
            storage.write_bytes_atomic(manifest_url(self.root, self.corpus), manifest)
        except BaseException:
            self._abort()
            raise
        self._remove_unlisted(listed)

    def _write_split(self, split: str, spool: _Spool, progress) -> list[dict]:
        """Shuffle one split's spooled samples into its shards in the staging folder; -> their manifest entries."""
        try:
            order = np.random.default_rng(self.shuffle_seed).permutation(len(spool.offsets))
            entries, start = [], 0
            for index, n in enumerate(
                shard_counts(len(order), spool.bytes, self.shard_bytes, self.min_shards, self.shard_size)
            ):
                name = shard_name(self.corpus, split, index)
                url = storage.join(self.staging_url, split, name)
                entries.append(_write_shard(url, name, spool.chunks(order[start : start + n])))
                start += n
                progress.update(n)
            return entries
        finally:
            spool.discard()

    def _remove_unlisted(self, listed: set[str]) -> None:
        """Remove the previous run's shards that the new manifest does not list, and any staging folder."""
        shard_re = re.compile(rf"^([A-Za-z0-9_\-]+)/{re.escape(self.corpus)}-\1-\d{{6}}\.tar$")
        staging = {storage.split_url(self.staging_url)[1]}
        for rel in storage.list_files(self.corpus_url):
            if rel.startswith(_STAGING):
                staging.add(rel.split("/")[0])
            elif shard_re.match(rel) and rel not in listed:
                storage.delete(storage.join(self.corpus_url, rel))
        for folder in sorted(staging):
            storage.delete_prefix(storage.join(self.corpus_url, folder))
        if not storage.is_s3(self.corpus_url):  # empty local folders of splits that no longer exist
            for split in os.listdir(self.corpus_url):
                with suppress(OSError):
                    os.rmdir(os.path.join(self.corpus_url, split))

    def _abort(self) -> None:
        for spool in self._spools.values():
            spool.discard()
        self._spools.clear()
        # Best effort: the exception that brought us here matters more than a failed cleanup, and the
        # next successful run of this corpus removes a leftover staging folder.
        with suppress(StoreError):
            storage.delete_prefix(self.staging_url)
