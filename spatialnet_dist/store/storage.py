"""Storage: local paths and `s3://bucket/prefix` URLs behind one small set of functions. Each one is the
local implementation and the dispatch of an s3:// URL to store/s3.py (boto3, retried through outages);
URLs and the errors both raise are store/location.py's, imported here for every caller.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import BinaryIO

from spatialnet_dist.errors import disk_full, is_disk_full
from spatialnet_dist.store import s3
from spatialnet_dist.store.location import (  # noqa: F401  (callers use them as storage.X)
    NotFoundError,
    StoreError,
    StoreUnavailable,
    check_relative,
    is_s3,
    join,
    split_s3,
    split_url,
)
from spatialnet_dist.store.s3 import (  # noqa: F401  (callers use them as storage.X)
    set_retry_budget,  # where a run starts
    take_outages,  # what a run records of the outages it rode out
)

# ---- files and objects ----


def read_bytes(url: str) -> bytes:
    with open_stream(url) as f:
        return f.read()


def read_range(url: str, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of a file or object (S3: one ranged GET)."""
    if is_s3(url):
        return s3.read_range(url, offset, length)
    try:
        with open(url, "rb") as f:
            return os.pread(f.fileno(), length, offset)
    except FileNotFoundError:
        raise NotFoundError(f"{url}: not found") from None
    except OSError as e:
        raise StoreError(f"{url}: {e.strerror}") from None


def open_stream(url: str) -> BinaryIO:
    """A binary readable: a local file, or the body of an S3 GET that resumes after a dropped connection
    (read in-process by shard_tar.py)."""
    if is_s3(url):
        return s3.ResumingBody(url)
    try:
        return open(url, "rb")
    except FileNotFoundError:
        raise NotFoundError(f"{url}: not found") from None
    except OSError as e:
        raise StoreError(f"{url}: {e.strerror}") from None


def exists(url: str) -> bool:
    if is_s3(url):
        return s3.exists(url)
    return os.path.isfile(url)


def size(url: str) -> int:
    """The size in bytes of a file or object: NotFoundError when there is none."""
    if is_s3(url):
        return s3.size(url)
    try:
        return os.path.getsize(url)
    except FileNotFoundError:
        raise NotFoundError(f"{url}: not found") from None
    except OSError as e:
        raise StoreError(f"{url}: {e.strerror}") from None


def s3_etag(url: str) -> str:
    """The ETag of an S3 object (it changes with the content): NotFoundError when there is none."""
    return s3.etag(url)


def _local_temp(path: str) -> str:
    # Same directory as the target, so os.replace is an atomic rename; hidden, so no reader lists it.
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Readers see the old content or the new, never a part (local: temp + rename; S3: a PUT is atomic). A full
    disk: errors.DiskFull naming `url` and the free space, the old content intact (so too `put_file`)."""
    if is_s3(url):
        s3.write_bytes(url, data)
        return
    tmp = _local_temp(url)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, url)
    except OSError as e:
        _remove_quietly(tmp)
        if is_disk_full(e):  # the temp file gone first: the free space named is what is left without it
            raise disk_full(url) from None
        raise StoreError(f"{url}: cannot write ({e.strerror})") from None


def put_file(path: str, url: str) -> None:
    """Copy a local file to `url` atomically; to S3 as a multipart upload when big."""
    if is_s3(url):
        s3.put_file(path, url)
        return
    tmp = _local_temp(url)
    try:
        shutil.copyfile(path, tmp)
        os.replace(tmp, url)
    except OSError as e:
        _remove_quietly(tmp)
        if is_disk_full(e):  # the temp file gone first: the free space named is what is left without it
            raise disk_full(url) from None
        raise StoreError(f"{url}: cannot write ({e.strerror})") from None


def move(src: str, dst: str) -> None:
    """Local: an atomic rename (same filesystem). S3: a server-side copy (multipart when big), then delete."""
    if is_s3(src) != is_s3(dst):
        raise StoreError(f"cannot move {src} to {dst}: both must be local or both S3")
    if is_s3(src):
        s3.move(src, dst)
        return
    try:
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        os.replace(src, dst)
    except FileNotFoundError:
        raise NotFoundError(f"{src}: not found") from None
    except OSError as e:
        raise StoreError(f"cannot move {src} to {dst}: {e.strerror}") from None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def delete(url: str) -> None:
    """Remove one file or object; a missing one is not an error."""
    if is_s3(url):
        s3.delete(url)
        return
    _remove_quietly(url)


def delete_prefix(url: str) -> None:
    """Remove everything under a folder or key prefix."""
    if is_s3(url):
        s3.delete_prefix(url)
        return
    shutil.rmtree(url, ignore_errors=True)


# ---- listing ----


def list_dir(url: str) -> list[str]:
    """Sorted names of the files and folders directly under `url` (S3: under the prefix `url/`)."""
    if is_s3(url):
        return s3.list_dir(url)
    try:
        return sorted(os.listdir(url))
    except FileNotFoundError:
        raise NotFoundError(f"{url}: not found") from None
    except OSError as e:
        raise StoreError(f"{url}: {e.strerror}") from None


def list_files(url: str) -> list[str]:
    """Sorted paths, relative to `url` and '/'-separated, of every file below it ([] when there is none)."""
    if is_s3(url):
        return s3.list_files(url)
    out = []
    for folder, _, files in os.walk(url):
        rel = os.path.relpath(folder, url).replace(os.sep, "/")
        out += [name if rel == "." else f"{rel}/{name}" for name in files]
    return sorted(out)
