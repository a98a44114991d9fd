"""Where data lives: local paths and `s3://bucket/prefix` URLs, parsed and joined the same way, and the
errors every storage operation raises (one line, naming the URL). Below storage.py and s3.py.
"""

from __future__ import annotations

import os

from spatialnet_dist.errors import UserError


class StoreError(UserError):
    """A storage failure (missing bucket or object, bad credentials, unreachable endpoint); names the URL."""


class NotFoundError(StoreError):
    """The object or file does not exist."""


class StoreUnavailable(StoreError):
    """The store did not answer (endpoint unreachable, dropped connections, timeouts, HTTP 5xx) for the whole
    retry budget (data.s3_retry_seconds): an outage, not bad input. It may come back, so a Ray run restarts
    its workers rather than ending (train/failures.py)."""


# ---- URLs ----


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise StoreError(f"{url}: no bucket name (expected s3://bucket/prefix)")
    check_relative(key.strip("/"), url)
    return bucket, key.strip("/")


def check_relative(path: str, where: str) -> str:
    """A key or relative path that stays below the folder it is joined to: no '..' part, no leading '/'
    (an S3 key is any string; joined to a local folder, '/x' or 'a/../../x' would land outside it)."""
    if path.startswith("/") or ".." in path.replace("\\", "/").split("/"):
        raise StoreError(f"{where}: refused path {path!r} ('..' parts and a leading '/' would leave its folder)")
    return path


def join(root: str, *parts: str) -> str:
    """Join with '/', for both URLs and local paths: join('s3://b/p', 'c', 'manifest.json')."""
    root = str(root)
    for p in parts:
        check_relative(str(p).lstrip("/"), f"{root}: joining {p!r}")
    stripped = [str(p).strip("/") for p in parts if str(p).strip("/")]
    return "/".join([root.rstrip("/") or root] + stripped) if stripped else root


def split_url(url: str) -> tuple[str, str]:
    """-> (parent, last name): 's3://b/root/corpus' -> ('s3://b/root', 'corpus'); 'corpus' -> ('.', 'corpus')."""
    url = str(url).rstrip("/")
    if is_s3(url):
        bucket, key = split_s3(url)
        head, _, name = key.rpartition("/")
        return join(f"s3://{bucket}", head), name
    return os.path.dirname(url) or ".", os.path.basename(url)

