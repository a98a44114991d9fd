"""ShardWriter: Samples -> tar shards + manifest under `<root>/<corpus>/`, local or S3.

Visibility (DESIGN.md, CONTRACT: shards): a reader only ever follows the manifest. Shards are first
written to a staging folder `<root>/<corpus>/.staging-<token>/` (S3: spooled to a local temp file,
then uploaded there). Only when the `with` block ends without an exception are they moved to their
final names (local: atomic rename; S3: server-side copy), then the manifest is written, then every
shard the new manifest does not list is removed. An exception inside the block removes the staging
folder and leaves the previous corpus (manifest and shards) untouched.

One writer per corpus at a time: a successful commit also removes staging folders left by killed runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tarfile
import tempfile
import uuid
from collections import Counter, defaultdict
from contextlib import suppress
from datetime import datetime, timezone

from tqdm import tqdm

from spatialnet_dist.store import storage
from spatialnet_dist.store.manifest import manifest_url
from spatialnet_dist.store.schema import SCHEMA_VERSION, Sample, SchemaError, encode_sample, shard_name
from spatialnet_dist.store.storage import StoreError
from spatialnet_dist.text import words

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_STAGING = ".staging-"
_BLOCK = 512  # tar header and data block size


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StoreError(f"{kind} name {name!r}: use letters, digits, '_' and '-' only")
    return name


def _tar_bytes(size: int) -> int:
    """Bytes a member of `size` bytes takes in a tar: one header block plus its data rounded up to blocks."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _padded(tar_bytes: int) -> int:
    """File size of a tar whose blocks (end blocks included) take `tar_bytes`: tarfile pads to whole records."""
    return -(-tar_bytes // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _HashingFile:
    """Write-only file wrapper that counts and hashes what goes through (tarfile's stream mode only writes)."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)


class _OpenShard:
    """One shard being written: a tar stream into a local file (the staging file itself, or an S3 spool)."""

    def __init__(self, staging_url: str, name: str):
        self.url, self.name, self.samples = staging_url, name, 0
        if storage.is_s3(staging_url):
            fd, self.path = tempfile.mkstemp(prefix="spatialnet-shard-", suffix=".tar")
            self.file = os.fdopen(fd, "wb")
        else:
            os.makedirs(os.path.dirname(staging_url), exist_ok=True)
            self.path, self.file = staging_url, open(staging_url, "wb")
        self.hashing = _HashingFile(self.file)
        self.tar = tarfile.open(fileobj=self.hashing, mode="w|", format=tarfile.PAX_FORMAT)
        self.tar_bytes = 2 * _BLOCK  # the end-of-archive blocks

    def add(self, members: dict[str, bytes]) -> None:
        key = members["__key__"]
        for ext in sorted(k for k in members if k != "__key__"):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            # Fixed metadata: the same samples give byte-identical shards (and sha256s) on every run.
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            self.tar.addfile(info, _BytesReader(data))
            self.tar_bytes += _tar_bytes(len(data))
        self.samples += 1

    def close(self) -> dict:
        """Finish the tar, upload an S3 spool to its staging key; -> the manifest's shard entry."""
        self.tar.close()
        self.file.close()
        if storage.is_s3(self.url):
            try:
                storage.put_file(self.path, self.url)
            finally:
                os.remove(self.path)
        return {"name": self.name, "samples": self.samples, "bytes": self.hashing.bytes, "sha256": self.sha256}

    @property
    def sha256(self) -> str:
        return self.hashing.sha256.hexdigest()

    def discard(self) -> None:
        with suppress(Exception):  # the tar may be half written; only the local file matters here
            self.tar.close()
        self.file.close()
        with suppress(OSError):
            os.remove(self.path)


class _BytesReader:
    """Minimal readable for tarfile.addfile (avoids a BytesIO copy of each member)."""

    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return bytes(out)


class _SplitCounts:
    def __init__(self):
        self.samples = self.captions = self.questions = 0
        self.questions_by_type: Counter = Counter()
        self.word_counts: Counter = Counter()
        self.answer_counts: defaultdict[str, Counter] = defaultdict(Counter)
        self.shards: list[dict] = []
        self.image_ids: set[str] = set()

    def add(self, sample: Sample) -> None:
        self.samples += 1
        self.captions += len(sample.captions)
        self.questions += len(sample.qa)
        for caption in sample.captions:
            self.word_counts.update(words(caption))
        for q in sample.qa:
            self.questions_by_type[q["type"]] += 1
            self.word_counts.update(words(q["question"]))
            self.answer_counts[q["type"]][str(q["answer"])] += 1

    def manifest(self) -> dict:
        def by_count(counter: Counter) -> dict:
            return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

        return {
            "samples": self.samples,
            "captions": self.captions,
            "questions": self.questions,
            "questions_by_type": dict(sorted(self.questions_by_type.items())),
            "shards": self.shards,
            "word_counts": by_count(self.word_counts),
            "answer_counts": {qtype: by_count(c) for qtype, c in sorted(self.answer_counts.items())},
        }


class ShardWriter:
    """Write one corpus. `with ShardWriter(root, "ucm", classes=[...]) as w: w.write(sample)`.

    A shard closes at `shard_size` samples or before its file would pass `max_shard_bytes` (a lone
    sample larger than the cap still gets a shard of its own).
    """

    def __init__(
        self,
        root: str,
        corpus: str,
        source: str = "",
        classes: list[str] | None = None,
        shard_size: int = 1000,
        max_shard_bytes: int = 2**30,
    ):
        if shard_size < 1 or max_shard_bytes < 1:
            raise StoreError(f"shard_size {shard_size} and max_shard_bytes {max_shard_bytes} must be positive")
        self.root, self.corpus = str(root), _check_name("corpus", corpus)
        self.source, self.classes = source, list(classes) if classes is not None else None
        self.shard_size, self.max_shard_bytes = shard_size, max_shard_bytes
        self.corpus_url = storage.join(self.root, corpus)
        self.staging_url = storage.join(self.corpus_url, f"{_STAGING}{uuid.uuid4().hex[:12]}")
        self.splits: dict[str, _SplitCounts] = {}
        self._open: dict[str, _OpenShard] = {}
        self._progress = None

    def __enter__(self) -> ShardWriter:
        self._progress = tqdm(desc=f"writing {self.corpus}", unit=" img", file=sys.stderr, disable=None)
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
        members = encode_sample(sample)
        size = sum(_tar_bytes(len(v)) for k, v in members.items() if k != "__key__")
        counts = self.splits.setdefault(split, _SplitCounts())
        shard = self._open.get(split)
        if shard and (shard.samples >= self.shard_size or _padded(shard.tar_bytes + size) > self.max_shard_bytes):
            counts.shards.append(shard.close())
            shard = None
        if shard is None:
            name = shard_name(self.corpus, split, len(counts.shards))
            shard = self._open[split] = _OpenShard(storage.join(self.staging_url, split, name), name)
        shard.add(members)
        counts.image_ids.add(sample.image_id)
        counts.add(sample)
        self._progress.update(1)

    def manifest(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "corpus": self.corpus,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": self.source,
            "classes": self.classes,
            "splits": {split: counts.manifest() for split, counts in sorted(self.splits.items())},
        }

    def _commit(self) -> None:
        if not self.splits:
            self._abort()
            raise StoreError(f"{self.corpus_url}: no samples written; the corpus is left as it was")
        listed = set()
        try:
            for split, shard in self._open.items():
                self.splits[split].shards.append(shard.close())
            self._open.clear()
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
        for shard in self._open.values():
            shard.discard()
        self._open.clear()
        # Best effort: the exception that brought us here matters more than a failed cleanup, and the
        # next successful run of this corpus removes a leftover staging folder.
        with suppress(StoreError):
            storage.delete_prefix(self.staging_url)
