"""S3 through boto3, configured only by the standard AWS environment (AWS_ENDPOINT_URL for MinIO, Ceph
and other S3-compatible stores, keys, region, profiles, instance roles), with botocore's "standard" retry
mode (backoff on throttling and transient errors). botocore retries one request; an outage of the
endpoint outlasts that, so every S3 operation here is retried again with backoff for up to
`data.s3_retry_seconds` (`set_retry_budget`), and an object read that breaks mid-body resumes at its byte
offset (HTTP Range) of the same object version (If-Match on its ETag): a shard reader never sees the
outage. Every failure becomes a one-line `StoreError` that names the URL (and, for an outage, the
endpoint); credentials are never part of a message. Callers go through storage.py, which dispatches
local paths and S3 URLs.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from spatialnet_dist import versions
from spatialnet_dist.store.location import NotFoundError, StoreError, StoreUnavailable, check_relative, join, split_s3

MULTIPART_BYTES = 64 * 2**20  # uploads above this go in parts of this size (S3's 5 GiB single-PUT limit is far off)
_ENV = (  # the environment a client depends on: a change (a test fixture, a new profile) builds a new client
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_MAX_ATTEMPTS",
)
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT_CODES = {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
READ_PART_BYTES = 2**20  # what a read to the end of an object asks for at a time
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.25, 8.0  # waits between tries during an outage: doubling, capped
DEFAULT_RETRY_SECONDS = 120.0  # config key data.s3_retry_seconds
_retry_budget_s = DEFAULT_RETRY_SECONDS  # set_retry_budget(cfg.data.s3_retry_seconds) where a run starts
_ridden_out: list[dict] = []  # outages this process rode out since take_outages() last took them
_ridden_out_lock = threading.Lock()  # uploads and metric writes may ride out one outage in several threads
T = TypeVar("T")


# ---- the client and its errors ----


def s3_client():
    """The process's boto3 S3 client (built once per process and AWS environment)."""
    return _client(os.getpid(), tuple(os.environ.get(k) for k in _ENV))


@functools.lru_cache(maxsize=8)
def _client(pid: int, env: tuple):
    # pid in the key: a forked loader worker must not share the parent's connection pool.
    versions.require("boto3")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", 5))
        config = Config(retries={"mode": "standard", "max_attempts": attempts})
        return boto3.session.Session().client("s3", config=config)
    except (BotoCoreError, ValueError) as e:
        raise StoreError(f"cannot configure the S3 client: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def s3_error(e: Exception, url: str) -> StoreError:
    """A boto3/botocore exception -> a one-line StoreError naming the URL (never the credentials)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(e, S3UploadFailedError) and isinstance(e.__context__, ClientError):
        e = e.__context__  # boto3's transfer manager wraps the ClientError that says what went wrong
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", "")) or str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code == "NoSuchBucket":
            return StoreError(f"bucket {err.get('BucketName') or split_s3(url)[0]} does not exist ({url})")
        if code in _MISSING:
            return NotFoundError(f"{url}: not found")
        if code == "PreconditionFailed":
            return StoreError(f"{url}: the object changed while it was being read")
        if code in _DENIED:
            return StoreError(f"access denied to {url} ({code}): check AWS credentials")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if isinstance(status, int) and status >= 500:
            return StoreUnavailable(f"{url}: S3 error {code} (HTTP {status}): {_one_line(err.get('Message', e))}")
        return StoreError(f"{url}: S3 error {code}: {_one_line(err.get('Message', e))}")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return StoreError(
            f"no usable AWS credentials for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
        )
    if isinstance(e, ProfileNotFound):
        return StoreError(f"{url}: {_one_line(e)}")
    if isinstance(e, (BotoConnectionError, ConnectionError)):  # endpoint unreachable, connect/read timeouts
        parts = urlsplit(getattr(e, "kwargs", {}).get("endpoint_url", ""))  # scheme://host:port, not the key
        endpoint = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "?"
        return StoreUnavailable(f"cannot reach S3 endpoint {endpoint} for {url} ({e.__class__.__name__})")
    return StoreError(f"{url}: {e.__class__.__name__}: {_one_line(e)}")


def set_retry_budget(seconds: float) -> None:
    """How long an S3 operation keeps trying through an outage (config key data.s3_retry_seconds)."""
    global _retry_budget_s
    _retry_budget_s = float(seconds)


def take_outages(merge_within_s: float = 1.0) -> list[dict]:
    """The outages this process's S3 operations rode out since the last call, each {"start", "end" (wall clock),
    "seconds", "url" (the first operation it held up), "endpoint", "cause"}: the operations that overlap (or
    follow within `merge_within_s`) merged into one, as one outage of the endpoint holds up every operation
    that meets it."""
    with _ridden_out_lock:
        spans = sorted(_ridden_out, key=lambda o: o["start"])
        _ridden_out.clear()
    merged: list[dict] = []
    for span in spans:
        if merged and span["start"] <= merged[-1]["end"] + merge_within_s:
            merged[-1]["end"] = max(merged[-1]["end"], span["end"])
        else:
            merged.append(dict(span))
    return [{**o, "seconds": round(o["end"] - o["start"], 2)} for o in merged]


def _transient(e: BaseException) -> bool:
    """A failure a later try can get past: the endpoint unreachable, a connection dropped or timed out, a 5xx."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(e, ClientError):
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return str(e.response.get("Error", {}).get("Code", "")) in _TRANSIENT_CODES or status in _TRANSIENT_CODES
    return isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, ConnectionError, TimeoutError))


def _s3_call(url: str, operation: Callable[[], T]) -> T:
    """operation(), tried again with backoff through transient failures until the retry budget is spent;
    its errors become one-line StoreErrors naming `url`."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    deadline, wait, first_failure = None, BACKOFF_FIRST_S, None
    while True:
        try:
            result = operation()
            if first_failure is not None:
                with _ridden_out_lock:
                    _ridden_out.append({"start": first_failure[0], "end": time.time(), "url": url,
                                        "endpoint": s3_client().meta.endpoint_url, "cause": first_failure[1]})
            return result
        except (ClientError, BotoCoreError, Boto3Error, ConnectionError, TimeoutError) as e:
            cause = e.__context__ if isinstance(e, Boto3Error) and e.__context__ is not None else e
            if not _transient(cause):
                raise s3_error(e, url) from None
            now = time.monotonic()
            deadline = deadline or now + _retry_budget_s
            first_failure = first_failure or (time.time(), cause.__class__.__name__)
            if now >= deadline:
                raise StoreUnavailable(
                    f"S3 endpoint {s3_client().meta.endpoint_url} unreachable or failing for {_retry_budget_s:g} s "
                    f"(data.s3_retry_seconds) while accessing {url} ({cause.__class__.__name__})"
                ) from None
            time.sleep(min(wait, deadline - now))
            wait = min(2 * wait, BACKOFF_MAX_S)


class ResumingBody(io.RawIOBase):
    """The body of an S3 GET that survives a dropped connection: a read that fails opens the object again
    at the offset read so far (HTTP Range), pinned to the version first opened (If-Match on its ETag)."""

    def __init__(self, url: str):
        super().__init__()
        self.url, (self.bucket, self.key) = url, split_s3(url)
        self.offset, self.etag, self._body = 0, None, None
        _s3_call(url, self._open)

    def _open(self) -> None:
        resume = {"Range": f"bytes={self.offset}-", "IfMatch": self.etag} if self.offset else {}
        response = s3_client().get_object(Bucket=self.bucket, Key=self.key, **resume)
        self.etag = self.etag or response.get("ETag")
        self._body = response["Body"]

    def _read_once(self, n: int) -> bytes:
        if self._body is None:
            self._open()
        try:
            return self._body.read(n)
        except BaseException:
            self._body.close()
            self._body = None  # reopened at self.offset by the next try
            raise

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:  # to the end, in parts, so that a broken connection loses no more than one part
            return b"".join(iter(lambda: self.read(READ_PART_BYTES), b""))
        data = _s3_call(self.url, lambda: self._read_once(n))
        self.offset += len(data)
        return data

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)


# ---- operations: `url` is an s3:// URL ----


def read_range(url: str, offset: int, length: int) -> bytes:
    bucket, key = split_s3(url)
    return _s3_call(url, lambda: s3_client().get_object(
        Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")["Body"].read())


def etag(url: str) -> str:
    """The ETag of an S3 object (it changes with the content): NotFoundError when there is none."""
    bucket, key = split_s3(url)
    return _s3_call(url, lambda: s3_client().head_object(Bucket=bucket, Key=key))["ETag"].strip('"')


def size(url: str) -> int:
    """The object's length in bytes: NotFoundError when there is none."""
    bucket, key = split_s3(url)
    return int(_s3_call(url, lambda: s3_client().head_object(Bucket=bucket, Key=key))["ContentLength"])


def exists(url: str) -> bool:
    bucket, key = split_s3(url)
    try:
        _s3_call(url, lambda: s3_client().head_object(Bucket=bucket, Key=key))
        return True
    except NotFoundError:
        return False


def write_bytes(url: str, data: bytes) -> None:
    """One PUT (a multipart upload when big): atomic, readers see the old object or the new."""
    bucket, key = split_s3(url)
    _s3_call(url, lambda: s3_client().upload_fileobj(io.BytesIO(data), bucket, key, Config=_transfer_config()))


def put_file(path: str, url: str) -> None:
    bucket, key = split_s3(url)
    _s3_call(url, lambda: s3_client().upload_file(path, bucket, key, Config=_transfer_config()))


def move(src: str, dst: str) -> None:
    """A server-side copy (multipart when big), then a delete."""
    (sb, sk), (db, dk) = split_s3(src), split_s3(dst)
    _s3_call(src, lambda: s3_client().copy({"Bucket": sb, "Key": sk}, db, dk, Config=_transfer_config()))
    _s3_call(src, lambda: s3_client().delete_object(Bucket=sb, Key=sk))


def delete(url: str) -> None:
    bucket, key = split_s3(url)
    _s3_call(url, lambda: s3_client().delete_object(Bucket=bucket, Key=key))


def delete_prefix(url: str) -> None:
    bucket, prefix = split_s3(url)
    keys = [join(prefix, rel) for rel in list_files(url)]
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
        _s3_call(url, lambda batch=batch: s3_client().delete_objects(Bucket=bucket, Delete=batch))


def _s3_pages(url: str, **kwargs) -> list[dict]:
    bucket, prefix = split_s3(url)
    prefix = prefix + "/" if prefix else ""
    pages = s3_client().get_paginator("list_objects_v2")
    return _s3_call(url, lambda: list(pages.paginate(Bucket=bucket, Prefix=prefix, **kwargs)))


def list_dir(url: str) -> list[str]:
    names = set()
    for page in _s3_pages(url, Delimiter="/"):
        names.update(p["Prefix"].rstrip("/").rpartition("/")[2] for p in page.get("CommonPrefixes", []))
        names.update(o["Key"].rpartition("/")[2] for o in page.get("Contents", []))
    return sorted(names)


def list_files(url: str) -> list[str]:
    n = len(split_s3(url)[1]) + 1 if split_s3(url)[1] else 0
    # The paths are joined to local folders (a checkpoint's copy): a key that would leave it is refused.
    return sorted(check_relative(o["Key"][n:], url) for page in _s3_pages(url) for o in page.get("Contents", []))
