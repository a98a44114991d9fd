"""S3 outages: reads resume at their byte offset, every operation retries within data.s3_retry_seconds,
and an outage past the budget is one line naming the endpoint. moto's server sits behind a FlakyProxy."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time

import boto3
import pytest

from spatialnet_dist.store import s3, storage
from spatialnet_dist.store.storage import StoreError, StoreUnavailable


def _put(endpoint: str, bucket: str, key: str, data: bytes) -> str:
    """Upload straight to moto (not through the proxy)."""
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def test_read_cut_mid_body_resumes_with_identical_bytes(s3_endpoint, s3_bucket, flaky_s3):
    data = os.urandom(300_000)
    url = _put(s3_endpoint, s3_bucket, "shard.bin", data)
    flaky_s3.cut_after(50_000, connections=3)
    assert storage.read_bytes(url) == data
    assert flaky_s3.cuts == 3  # three bodies broke; each read went on at its offset

    flaky_s3.cut_after(20_000, connections=2)
    with storage.open_stream(url) as f:  # small reads, as tarfile makes them
        parts = iter(lambda: f.read(4096), b"")
        assert b"".join(parts) == data
    assert flaky_s3.cuts == 5


def test_tar_read_through_cut_connections(s3_endpoint, s3_bucket, flaky_s3):
    members = {f"s{i:03d}.bin": os.urandom(5000 + i) for i in range(40)}
    url = _put(s3_endpoint, s3_bucket, "c/train/c-train-000000.tar", _tar(members))
    flaky_s3.cut_after(30_000, connections=4)
    with storage.open_stream(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        read = {m.name: tar.extractfile(m).read() for m in tar}
    assert read == members and flaky_s3.cuts == 4


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_shard_stream_past_budget_stops_with_one_line(s3_endpoint, s3_bucket, flaky_s3, monkeypatch):
    from spatialnet_dist.data.streams import StreamCounts, read_shards

    monkeypatch.setattr(s3, "_retry_budget_s", 1.0)
    url = _put(s3_endpoint, s3_bucket, "c-train-000000.tar", _tar({f"s{i:03d}.bin": os.urandom(100_000) for i in range(40)}))
    raws = read_shards([{"url": url, "samples": 40}], StreamCounts("captioning", 0.5))
    next(raws)
    flaky_s3.down()  # mid-shard, for longer than the budget
    with pytest.raises(StoreUnavailable) as err:
        list(raws)
    assert str(err.value).startswith(f"S3 endpoint {flaky_s3.url} unreachable or failing for 1 s")
    assert "\n" not in str(err.value) and " @ " not in str(err.value) and url in str(err.value)


def test_outage_within_budget_is_survived_and_recorded_once(s3_endpoint, s3_bucket, flaky_s3, monkeypatch, tmp_path):
    """Each outage ridden out is one record (RunDir.record_outages: failures.json's class store_outage), however
    many operations it held up, naming the first of them."""
    from spatialnet_dist.train.rundir import STORE_OUTAGE, RunDir

    monkeypatch.setattr(s3, "_retry_budget_s", 20)
    url = _put(s3_endpoint, s3_bucket, "a.json", b"{}")
    assert storage.exists(url)  # a pooled connection, reset by the outage
    storage.take_outages()
    flaky_s3.outage(0, 1.5).join(0.2)
    assert storage.read_bytes(url) == b"{}"
    assert storage.exists(url)  # held up by the same outage: no second record
    time.sleep(1.5)  # apart by more than take_outages' merge_within_s: a second outage
    flaky_s3.outage(0, 1.5).join(0.2)
    storage.write_bytes_atomic(f"s3://{s3_bucket}/metrics.jsonl", b"line\n")
    assert storage.read_bytes(f"s3://{s3_bucket}/metrics.jsonl") == b"line\n"
    run = RunDir(str(tmp_path))
    lines = run.record_outages(step=7)
    outages = run.failures(STORE_OUTAGE)
    assert len(lines) == len(outages) == 2 and run.failures() == [], outages
    assert [o["url"] for o in outages] == [url, f"s3://{s3_bucket}/metrics.jsonl"]
    assert all(o["step"] == 7 and 1.0 <= o["seconds"] < 10 for o in outages), outages
    assert run.record_outages(step=8) == []


def test_outage_past_budget_is_one_line_naming_the_endpoint(s3_endpoint, s3_bucket, flaky_s3, monkeypatch):
    monkeypatch.setattr(s3, "_retry_budget_s", 1.0)
    url = _put(s3_endpoint, s3_bucket, "a.json", b"{}")
    flaky_s3.down()
    with pytest.raises(StoreUnavailable) as err:
        storage.read_bytes(url)
    message = str(err.value)
    assert "\n" not in message and flaky_s3.url in message and url in message and "data.s3_retry_seconds" in message
    with pytest.raises(StoreUnavailable):
        storage.write_bytes_atomic(url, b"[]")
    flaky_s3.up()


def test_missing_object_is_not_retried(s3_bucket, flaky_s3, monkeypatch):
    monkeypatch.setattr(s3, "_retry_budget_s", 30)
    with pytest.raises(storage.NotFoundError):
        storage.read_bytes(f"s3://{s3_bucket}/nope.json")  # at once, not after the budget


@pytest.mark.parametrize("url", ["s3://b/a/../c", "s3://b/../c", "s3://b/a/.."])
def test_dotdot_keys_are_refused(url):
    with pytest.raises(StoreError, match="refused path"):
        storage.split_s3(url)


def test_joined_parts_may_not_leave_the_root():
    with pytest.raises(StoreError, match="refused path"):
        storage.join("shards", "corpus", "../../etc/passwd")
    assert storage.join("shards", "/corpus/", "x.tar") == "shards/corpus/x.tar"


@pytest.mark.parametrize("key", ["ckpt//etc/evil", "ckpt/zero/../../evil"])
def test_checkpoint_copy_refuses_keys_that_leave_its_folder(s3_endpoint, s3_bucket, key):
    from spatialnet_dist.checkpoint import local_copy

    """A checkpoint's manifest naming a file outside its folder is refused before anything is fetched."""
    files = {"meta.json": {"sha256": "0" * 64, "bytes": 2}, key.removeprefix("ckpt/"): {"sha256": "0" * 64, "bytes": 1}}
    _put(s3_endpoint, s3_bucket, "ckpt/manifest.json", json.dumps({"step": 1, "files": files}).encode())
    with pytest.raises(StoreError, match="refused path"):
        with local_copy(f"s3://{s3_bucket}/ckpt"):
            pass


def test_retry_budget_is_the_config_key(monkeypatch):
    from spatialnet_dist import config as config_mod
    from spatialnet_dist.train.launch import load_config, parse_args

    monkeypatch.setattr(s3, "_retry_budget_s", s3._retry_budget_s)  # restored after the test
    assert s3._retry_budget_s == config_mod.DataConfig().s3_retry_seconds == 120
    load_config(parse_args(["--set", "data.s3_retry_seconds=7"]))
    assert s3._retry_budget_s == 7
    with pytest.raises(config_mod.ConfigError, match="data.s3_retry_seconds"):
        config_mod.load(None, ["data.s3_retry_seconds=-1"])
