"""Random access to the samples of tar shards by their position (the idea of WebDataset's `wids`).

A shard's member index (byte offset and size of each member, grouped into samples by key in tar
order, as WebDataset groups them) is built on first use per reader, i.e. per loader worker and
shard, by walking the tar headers, and kept in memory. Local shards are then read by seek + read
through a small cache of open files. An S3 shard is downloaded whole, once, into a node-local
cache folder (`data.cache_dir`; temp file + rename, so loader workers and ranks that fetch the
same shard at once each see a complete file or none) and read from there; the download goes
through storage.open_stream, so it keeps the S3 retries and raises StoreUnavailable in an outage.

A truncated or corrupted shard is indexed up to its first bad header: the samples after it are
missing (`ShardIndex.problem` says why). A missing shard raises StoreError naming it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

from spatialnet_dist.store.storage import NotFoundError, StoreError, is_s3, open_stream, s3_etag

OPEN_FILES = 16  # open shard files a reader keeps
_CORRUPT_TAR = (tarfile.TarError, EOFError, ValueError)


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "spatialnet-shards")


@dataclass
class ShardIndex:
    samples: list[tuple[str, dict[str, tuple[int, int]]]]  # per sample: key, {extension: (offset, size)}
    problem: str = ""  # why the index ends early ("" when the tar was read to its end)


def index_tar(f: BinaryIO, size: int) -> ShardIndex:
    """The samples of a seekable tar file, in tar order; members cut off by the file's end are left out."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    problem = ""
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isreg() or member.name.startswith("__"):
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                if member.offset_data + member.size > size:
                    problem = f"member {member.name} cut off at byte {size}"
                    break
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext.lower()] = (member.offset_data, member.size)
    except _CORRUPT_TAR as e:
        problem = f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__
    return ShardIndex(samples, problem)


class ShardReader:
    """The samples of shards by (url, position), for one process (a loader worker); not shared between processes."""

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = cache_dir or default_cache_dir()
        self._indexes: dict[str, ShardIndex] = {}
        self._files: OrderedDict[str, BinaryIO] = OrderedDict()  # least recently used first

    def index(self, url: str) -> ShardIndex:
        if url not in self._indexes:
            f = self._file(url)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(0)
            self._indexes[url] = index_tar(f, size)
        return self._indexes[url]

    def sample(self, url: str, position: int) -> dict | None:
        """The raw WebDataset sample {"__key__", "__url__", ext: bytes} at `position`, None when the shard has none there."""
        index = self.index(url)
        if position >= len(index.samples):
            return None
        key, members = index.samples[position]
        f = self._file(url)
        raw = {"__key__": key, "__url__": url}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            raw[ext] = f.read(size)
        return raw

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, url: str) -> BinaryIO:
        if url in self._files:
            self._files.move_to_end(url)
            return self._files[url]
        path = self._local_copy(url) if is_s3(url) else url
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{url}: not found") from None
        except OSError as e:
            raise StoreError(f"{url}: {e.strerror}") from None
        self._files[url] = f
        if len(self._files) > OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        return f

    def _local_copy(self, url: str) -> str:
        """The node-local copy of an S3 shard, downloaded on first use (by whichever process gets there first);
        named by URL and ETag, so a shard rewritten in the store is fetched again."""
        version = hashlib.sha256(f"{url} {s3_etag(url)}".encode()).hexdigest()[:16]
        name = f"{version}-{url.rsplit('/', 1)[-1]}"
        path = os.path.join(self.cache_dir, name)
        if os.path.isfile(path):
            return path
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = os.path.join(self.cache_dir, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open_stream(url) as body, open(tmp, "wb") as out:  # StoreError naming the URL; retried in outages
                shutil.copyfileobj(body, out, 2**20)
            os.replace(tmp, path)  # atomic: a concurrent download of the same shard replaces it with the same bytes
        except OSError as e:
            raise StoreError(f"{url}: cannot cache it in data.cache_dir={self.cache_dir} ({e.strerror})") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
