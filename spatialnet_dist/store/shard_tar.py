"""The one reader of a shard's tar: its members grouped into samples by key, read front to back from a stream
(`shard_samples`: data/streams.py's evaluation and inference reads, records.py, verify.py) or indexed by byte
range for random access (`index_tar`: data/indexed.py), and the one rule for a shard whose bytes are not a
well-formed tar.

A sample is a run of consecutive members sharing a key, the name up to the first dot of its base name, as
WebDataset groups them; its members are keyed by their extension, lowercased. Names starting with "__"
(WebDataset's metadata) and names without an extension are no sample's members.

A shard is bad in one of two ways. Its bytes are not a tar (cut inside a member, a corrupted header or
member, a member twice in one sample): `UnreadableShard`, one line naming the shard and, where known, the
member. Or it reads cleanly but holds another number of samples than its manifest lists: tarfile ends a tar
at its first zero or unreadable header after the first, so a tar cut at a member boundary, or with a later
header corrupted, reads as a shorter one; the caller, who knows the manifest's count, tells in the words of
`count_problem`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

from spatialnet_dist.store.location import StoreError

# What tarfile raises on bytes that are not a well-formed tar: its own errors, and ValueError from pax header
# values it parses (GNU sparse maps, hdrcharset). Shards are plain tars, opened without decompression, so no
# decompressor's errors (zlib.error, EOFError) can arise; storage errors of the stream pass through.
_NOT_A_TAR = (tarfile.TarError, ValueError)


class UnreadableShard(StoreError):
    """A shard whose bytes are not a well-formed tar. `problem`: the message without the shard, for a report
    or a log line that names the shard itself."""

    def __init__(self, url: str, problem: str):
        super().__init__(url, problem)  # both in args: the error pickles from a loader worker
        self.url, self.problem = url, problem

    def __str__(self) -> str:
        return f"shard {self.url}: {self.problem}"


def _unreadable(url: str, cause: Exception | str, where: str) -> UnreadableShard:
    """`where`: " in member <name>" while its data was read, " after member <name>" at the header after it."""
    detail = cause if isinstance(cause, str) else str(cause) or cause.__class__.__name__
    return UnreadableShard(url, f"not a readable tar ({detail}{where})")


def count_problem(read: int, listed: int) -> str:
    """A shard read to its end (or to its first bad member) with another number of samples than its manifest lists."""
    return f"{read} sample(s) in the tar, the manifest lists {listed}"


def _sample_members(f: BinaryIO, url: str, mode: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, str, str]]:
    """(tar, member, key, extension) of the sample members of the tar in `f`, in tar order; headers that are
    not well-formed raise UnreadableShard."""
    where = ""
    try:
        with tarfile.open(fileobj=f, mode=mode) as tar:
            key, exts = None, set()
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it reads: a shard streams in constant memory
                where = f" after member {member.name}"
                if not member.isreg() or member.name.startswith("__"):
                    continue
                name_key, ext = base_plus_ext(member.name)
                if name_key is None:
                    continue
                ext = ext.lower()
                if name_key != key:
                    key, exts = name_key, set()
                elif ext in exts:
                    raise _unreadable(url, f"a second .{ext} member of sample {key}", where)
                exts.add(ext)
                yield tar, member, key, ext
    except _NOT_A_TAR as e:
        raise _unreadable(url, e, where) from None


def shard_samples(stream: BinaryIO, url: str, exts: Collection[str] | None = None) -> Iterator[dict]:
    """The samples of the shard `url`, read front to back from `stream` (closed by the caller; a seekable one
    is sought past the members not read, any other read through): {"__key__", "__url__", extension: bytes}
    with the members whose extension is in `exts` (all when None). Raises UnreadableShard."""
    seekable = getattr(stream, "seekable", None)
    sample: dict | None = None
    for tar, member, key, ext in _sample_members(stream, url, "r:" if seekable and seekable() else "r|"):
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if exts is None or ext in exts:
            try:
                sample[ext] = tar.extractfile(member).read()
            except _NOT_A_TAR as e:
                raise _unreadable(url, e, f" in member {member.name}") from None
    if sample is not None:
        yield sample


@dataclass
class ShardIndex:
    samples: list[tuple[str, dict[str, tuple[int, int]]]]  # per sample: key, {extension: (offset, size)}
    problem: str = ""  # why the index ends early, UnreadableShard's problem ("" when the tar was read to its end)


def index_tar(f: BinaryIO, size: int, url: str) -> ShardIndex:
    """The samples of the shard `url`, a seekable tar file of `size` bytes, by byte range, in tar order. The
    index of a tar that is not well-formed ends before its first bad member."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        for _, member, key, ext in _sample_members(f, url, "r:"):
            if member.offset_data + member.size > size:  # data not read: tarfile would notice at the next header only
                raise _unreadable(url, f"cut off at byte {size}", f" in member {member.name}")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = (member.offset_data, member.size)
    except UnreadableShard as e:
        return ShardIndex(samples, e.problem)
    return ShardIndex(samples)
