"""Random access to the samples of tar shards by their position (the idea of WebDataset's `wids`).

A shard's member index (byte offset and size of each member, grouped into samples by key in tar
order: store/shard_tar.index_tar) is built on first use per reader, i.e. per loader worker and
shard, by walking the tar headers, and kept in memory. Local shards are then read by seek + read
through a small cache of open files. An S3 shard is downloaded whole, once, into a node-local
cache folder (`data.cache_dir`; temp file + rename, so loader workers and ranks that fetch the
same shard at once each see a complete file or none) and read from there; the download goes
through storage.open_stream, so it keeps the S3 retries and raises StoreUnavailable in an outage.
A cache that cannot grow (its disk full) is not an error: the partial copy is removed, one warning names the
cache and its free space, and the shard is read from the store by ranged GETs instead: the same bytes, so the
same samples.

A truncated or corrupted shard is indexed up to its first bad member: the samples after it are
missing (`ShardIndex.problem` says why, in store/shard_tar's wording). A missing shard raises StoreError naming it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import uuid
from collections import OrderedDict
from typing import BinaryIO

from spatialnet_dist.errors import disk_full, is_disk_full
from spatialnet_dist.store.shard_tar import ShardIndex, index_tar
from spatialnet_dist.store.storage import NotFoundError, StoreError, is_s3, open_stream, read_range, s3_etag
from spatialnet_dist.store.storage import size as storage_size

log = logging.getLogger(__name__)

OPEN_FILES = 16  # open shard files a reader keeps
STREAM_BLOCK = 2**20  # bytes per ranged GET of a shard streamed because the cache is full


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "spatialnet-shards")


class ShardReader:
    """The samples of shards by (url, position), for one process (a loader worker); not shared between processes."""

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = cache_dir or default_cache_dir()
        self._indexes: dict[str, ShardIndex] = {}
        self._files: OrderedDict[str, BinaryIO] = OrderedDict()  # least recently used first
        self._cache_full = False  # warned that data.cache_dir has no room left

    def index(self, url: str) -> ShardIndex:
        if url not in self._indexes:
            f = self._file(url)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(0)
            self._indexes[url] = index_tar(f, size, url)
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
            f = io.BufferedReader(_RangedObject(url), STREAM_BLOCK) if path is None else open(path, "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{url}: not found") from None
        except OSError as e:
            raise StoreError(f"{url}: {e.strerror}") from None
        self._files[url] = f
        if len(self._files) > OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        return f

    def _local_copy(self, url: str) -> str | None:
        """The node-local copy of an S3 shard, downloaded on first use (by whichever process gets there first);
        named by URL and ETag, so a shard rewritten in the store is fetched again. None when data.cache_dir's disk
        is full (the partial copy removed, one warning naming the cache and its free space): the caller streams the
        shard from the store."""
        version = hashlib.sha256(f"{url} {s3_etag(url)}".encode()).hexdigest()[:16]
        name = f"{version}-{url.rsplit('/', 1)[-1]}"
        path = os.path.join(self.cache_dir, name)
        if os.path.isfile(path):
            return path
        if self._cache_full:  # found full by this reader: no second download cut short
            return None
        tmp = os.path.join(self.cache_dir, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            with open_stream(url) as body, open(tmp, "wb") as out:  # StoreError naming the URL; retried in outages
                shutil.copyfileobj(body, out, 2**20)
            os.replace(tmp, path)  # atomic: a concurrent download of the same shard replaces it with the same bytes
        except OSError as e:
            if not is_disk_full(e):
                raise StoreError(f"{url}: cannot cache it in data.cache_dir={self.cache_dir} ({e.strerror})") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)  # before the free space is named: what is left without the partial copy
        if os.path.isfile(path):
            return path
        self._warn_cache_full(url)
        return None

    def _warn_cache_full(self, url: str) -> None:
        """One warning per reader (a loader worker) when the cache cannot grow; the shards stream meanwhile."""
        if not self._cache_full:
            self._cache_full = True
            log.warning("%s; streaming %s and the shards after it from the store instead of caching them",
                        disk_full(self.cache_dir, "the shard cache (data.cache_dir)"), url)


class _RangedObject(io.RawIOBase):
    """An S3 object as a seekable binary file, read by ranged GETs (storage.read_range: retried through outages)
    where it cannot be cached. Wrapped in a buffer of STREAM_BLOCK bytes, so that walking a shard's tar headers
    takes one GET per block, not one per member."""

    def __init__(self, url: str):
        self.url, self.size, self.pos = url, storage_size(url), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = read_range(self.url, self.pos, n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)
