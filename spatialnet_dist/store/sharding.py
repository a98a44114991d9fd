"""Shard bytes: samples as tar chunks, spool files of encoded blocks, and shards cut out of them.

These functions run inside conversion tasks (this process, worker processes or Ray tasks on other
nodes: see `store.pool`), so they take and return plain picklable values and reach the store only
through `storage`. A spool file is a block's tar chunks end to end; a shard is a list of pieces
(spool, offset, length) copied in order and ended as tarfile ends a tar.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import BinaryIO

from spatialnet_dist.store import storage

_BLOCK = 512  # tar header and data block size
_S3_READS = 8  # ranged GETs in flight per shard task when its spools are S3 objects


def _padded(tar_bytes: int) -> int:
    """File size of a tar whose blocks (end blocks included) take `tar_bytes`: tarfile pads to whole records."""
    return -(-tar_bytes // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def tar_chunk(members: dict[str, bytes]) -> bytes:
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


@contextmanager
def _output(url: str) -> Iterator[BinaryIO]:
    """A binary file to write `url` through: the file itself (local), or a temp file uploaded once
    it is complete (S3)."""
    if not storage.is_s3(url):
        os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
        with open(url, "wb") as f:
            yield f
        return
    fd, path = tempfile.mkstemp(prefix="spatialnet-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        storage.put_file(path, url)
    finally:
        with suppress(OSError):
            os.remove(path)


def write_spool(url: str, chunks: list[bytes]) -> list[int]:
    """Write a block's chunks end to end to `url`; -> their offsets."""
    offsets, offset = [], 0
    with _output(url) as file:
        for chunk in chunks:
            file.write(chunk)
            offsets.append(offset)
            offset += len(chunk)
    return offsets


def read_pieces(spools: list[str], pieces: list[tuple[int, int, int]]) -> Iterator[bytes]:
    """The bytes of each piece (index into `spools`, offset, length), in order."""
    if spools and storage.is_s3(spools[0]):
        with ThreadPoolExecutor(_S3_READS) as pool:  # S3 latency, not bandwidth, bounds one GET at a time
            yield from pool.map(lambda p: storage.read_range(spools[p[0]], p[1], p[2]), pieces)
        return
    files = {}
    try:
        for spool, offset, length in pieces:
            if spool not in files:
                files[spool] = open(spools[spool], "rb")
            yield os.pread(files[spool].fileno(), length, offset)
    finally:
        for f in files.values():
            f.close()


def write_shard(url: str, name: str, chunks: Iterable[bytes]) -> dict:
    """One tar of sample chunks, ended as tarfile ends one (two zero blocks, padded to whole records),
    written straight to `url` (S3: a temp file, then one upload). -> the manifest's shard entry."""
    sha256, size, samples = hashlib.sha256(), 0, 0
    with _output(url) as file:
        for chunk in chunks:
            file.write(chunk)
            sha256.update(chunk)
            size, samples = size + len(chunk), samples + 1
        end = bytes(_padded(size + 2 * _BLOCK) - size)
        file.write(end)
        sha256.update(end)
        size += len(end)
    return {"name": name, "samples": samples, "bytes": size, "sha256": sha256.hexdigest()}


def cut_shard(url: str, name: str, spools: list[str], pieces: list[tuple[int, int, int]]) -> dict:
    """A conversion task: the shard `url` from spooled pieces. -> its manifest entry."""
    return write_shard(url, name, read_pieces(spools, pieces))
