"""The shard store: storage (local and moto S3), writer, manifest, inspect, verify, and their errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

import numpy as np
import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from spatialnet_dist.cli import main
from spatialnet_dist.errors import UserError
from spatialnet_dist.store import s3, storage
from spatialnet_dist.store.inspect import format_inspect, inspect_store
from spatialnet_dist.store.manifest import list_corpora, read_manifest, shard_urls
from spatialnet_dist.store.schema import (
    FIT_RULE,
    Sample,
    SchemaError,
    as_hwc,
    decode_sample,
    fit_image,
    validate_record,
)
from spatialnet_dist.store.storage import StoreError
from spatialnet_dist.store.verify import verify_store
from spatialnet_dist.store.writer import MIN_SHARDS, ShardWriter, shard_counts

CLASSES = ["field", "forest", "water"]


def make_samples(n: int, corpus: str = "toy", seed: int = 0, split=lambda i: "train" if i % 4 else "test") -> list:
    """RGB uint8 (PNG), 16-bit 5-band (NPY) and grayscale (PNG) images, with captions and questions."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        elif kind == 1:
            image = rng.integers(0, 65536, (8, 8, 5), dtype=np.uint16)
        else:
            image = rng.integers(0, 256, (9, 11), dtype=np.uint8)
        qa = [{"qid": f"q{i}a", "question": "How many cars?", "answer": i, "type": "count"}]
        if i % 2:
            qa.append({"qid": f"q{i}b", "question": "Is there water?", "answer": "yes", "type": "presence"})
        samples.append(
            Sample(
                corpus=corpus,
                image_id=f"img_{i:03d}",
                split=split(i),
                image=image,
                label=i % len(CLASSES),
                label_name=CLASSES[i % len(CLASSES)],
                captions=[f"A Field with {i} cars.", "Some trees."][: 1 + i % 2],
                qa=qa,
                meta={"i": i},
            )
        )
    return samples


def write(root: str, samples: list, corpus: str = "toy", **kwargs) -> dict:
    with ShardWriter(root, corpus, source="unit test", classes=CLASSES, **kwargs) as w:
        for s in samples:
            w.write(s)
    return read_manifest(root, corpus)


def read_samples(urls: list[str]) -> list[Sample]:
    """Read shards the way the data streams do: WebDataset's tar expander over in-process streams."""
    streams = ({"url": u, "stream": storage.open_stream(u)} for u in urls)
    return [decode_sample(members) for members in group_by_keys(tar_file_expander(streams))]


def assert_same(a: Sample, b: Sample) -> None:
    assert a.record() == b.record()
    assert b.image.dtype == a.image.dtype
    np.testing.assert_array_equal(as_hwc(a.image), b.image)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A store root: a local folder, or a prefix in a fresh bucket on moto's S3 server."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/stores/a"
    return str(tmp_path / "store")


# ---- writer + manifest ----


def test_round_trip_manifest_and_inspect(root, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where S3 spools and shards go first
    (tmp_path / "tmp").mkdir()
    samples = make_samples(7)
    manifest = write(root, samples, shard_size=2, min_shards=1)
    assert manifest["schema_version"] == 2 and manifest["corpus"] == "toy" and manifest["classes"] == CLASSES
    assert manifest["source"] == "unit test" and manifest["created"]
    assert manifest["shuffle_seed"] == 0 and manifest["image_size"] is None
    train = manifest["splits"]["train"]
    assert [s["samples"] for s in train["shards"]] == [2, 2, 1] and "resized" not in train
    assert train["samples"] == 5 and train["captions"] == 8 and train["questions"] == 8
    assert train["questions_by_type"] == {"count": 5, "presence": 3}
    assert train["answer_counts"]["presence"] == {"yes": 3} and train["answer_counts"]["count"]["5"] == 1
    assert train["word_counts"]["cars"] == 10 and train["word_counts"]["how"] == 5
    assert manifest["splits"]["test"]["samples"] == 2

    for split in ("train", "test"):
        urls = shard_urls(root, "toy", split)
        for url, entry in zip(urls, manifest["splits"][split]["shards"]):
            data = storage.read_bytes(url)
            assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        stored = {s.image_id: s for s in read_samples(urls)}
        assert sorted(stored) == sorted(s.image_id for s in samples if s.split == split)
        for want in (s for s in samples if s.split == split):
            assert_same(want, stored[want.image_id])
    assert {s.image.dtype.name for s in read_samples(shard_urls(root, "toy", "train"))} == {"uint8", "uint16"}

    # Only the manifest and the listed shards are left: no staging folder, no temp file.
    listed = {f"{split}/{s['name']}" for split, v in manifest["splits"].items() for s in v["shards"]}
    assert storage.list_files(storage.join(root, "toy")) == sorted(listed | {"manifest.json"})
    assert os.listdir(tmp_path / "tmp") == []
    assert list_corpora(root) == ["toy"]
    assert verify_store(root) == []

    assert main(["shards", "inspect", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == inspect_store(storage.join(root, "toy"))
    train_info = info["corpora"]["toy"]["splits"]["train"]
    assert train_info["shards"] == 3 and train_info["samples"] == 5
    assert train_info["bytes"] == sum(s["bytes"] for s in train["shards"])
    assert info["corpora"]["toy"]["classes"] == 3 and info["corpora"]["toy"]["tags"] is None
    assert "toy" in format_inspect(info) and "presence 3" in format_inspect(info)


def train_order(root: str) -> list[str]:
    return [s.image_id for s in read_samples(shard_urls(root, "toy", "train"))]


def contents(manifest: dict, split: str = "train") -> list[tuple]:
    """The shards of a split without their names (unique to each conversion): samples, bytes, sha256."""
    return [(s["samples"], s["bytes"], s["sha256"]) for s in manifest["splits"][split]["shards"]]


def test_shards_are_shuffled_deterministically_by_the_seed(tmp_path):
    samples = make_samples(40, split=lambda i: "train")
    a = write(str(tmp_path / "a"), samples, min_shards=4)
    b = write(str(tmp_path / "b"), samples, min_shards=4)
    assert contents(a) == contents(b)  # byte-identical: same sha256s
    other = write(str(tmp_path / "c"), samples, min_shards=4, shuffle_seed=1)
    assert other["shuffle_seed"] == 1
    orders = [train_order(str(tmp_path / d)) for d in "abc"]
    source = [s.image_id for s in samples]
    assert orders[0] == orders[1] and sorted(orders[0]) == sorted(orders[2]) == source
    assert orders[0] != source and orders[2] not in (source, orders[0])  # 40! orders: equal by chance ~never


def test_shard_counts_follow_bytes_floor_and_cap():
    assert shard_counts(10, 1000, 300, 1, None) == [3, 3, 2, 2]  # ceil(1000 / 300) shards, counts even
    assert shard_counts(5, 10, 2**20, 16, None) == [1] * 5  # the floor: one sample per shard at most
    assert shard_counts(100, 10, 2**20, 16, None) == [7] * 4 + [6] * 12
    assert shard_counts(10, 10, 2**20, 1, 3) == [3, 3, 2, 2]  # the cap: at most 3 samples per shard
    assert shard_counts(3, 10**9, 1, 1, None) == [1, 1, 1]  # samples bigger than the target: one each
    assert MIN_SHARDS == 16


def test_byte_target_sets_the_shard_count(tmp_path):
    samples = make_samples(12, split=lambda i: "train")
    one_each = write(str(tmp_path / "a"), samples, shard_bytes=1, min_shards=1)["splits"]["train"]["shards"]
    assert [s["samples"] for s in one_each] == [1] * 12
    whole = write(str(tmp_path / "b"), samples, min_shards=1)["splits"]["train"]["shards"]
    assert [s["samples"] for s in whole] == [12]
    target = whole[0]["bytes"] // 3  # the 12 samples' tar bytes are a little under whole["bytes"]
    shards = write(str(tmp_path / "c"), samples, shard_bytes=target, min_shards=1)["splits"]["train"]["shards"]
    assert [s["samples"] for s in shards] == [4, 4, 4]


def test_images_of_another_size_are_fitted_and_counted(tmp_path):
    root = str(tmp_path)
    samples = make_samples(7)  # (12, 10, 3) uint8, (8, 8, 5) uint16, (9, 11) uint8 in turn
    manifest = write(root, samples, image_size=(12, 10))
    assert manifest["image_size"] == [12, 10]
    assert manifest["splits"]["train"]["resized"] == {"rule": FIT_RULE, "count": 3}  # i = 1, 2, 5
    assert manifest["splits"]["test"]["resized"] == {"rule": FIT_RULE, "count": 1}  # i = 4
    stored = {s.image_id: s for split in ("train", "test") for s in read_samples(shard_urls(root, "toy", split))}
    for want in samples:
        got = stored[want.image_id]
        assert got.image.shape[:2] == (12, 10) and got.image.dtype == want.image.dtype
        if want.image.shape[:2] == (12, 10):
            assert got.meta == want.meta
            np.testing.assert_array_equal(got.image, want.image)
        else:
            assert got.meta == {**want.meta, "original_size": list(want.image.shape[:2])}
            np.testing.assert_array_equal(got.image, fit_image(want.image, (12, 10)))


def test_fit_rule_crops_the_centre_then_resizes():
    framed = np.full((242, 256, 3), 90, np.uint8)
    framed[:, :7] = framed[:, -7:] = 255  # the columns a 242x256 image loses to the square crop
    np.testing.assert_array_equal(fit_image(framed, (256, 256)), np.full((256, 256, 3), 90, np.uint8))
    assert fit_image(np.full((257, 257, 3), 3, np.uint8), (256, 256)).shape == (256, 256, 3)
    tall = np.zeros((40, 20), np.uint8)
    tall[10:30] = 200  # the centre 20x20 of a 40x20 image
    np.testing.assert_array_equal(fit_image(tall, (10, 10)), np.full((10, 10, 1), 200, np.uint8))
    deep = np.full((30, 30, 5), 40000, np.uint16)
    fitted = fit_image(deep, (16, 16))
    assert fitted.dtype == np.uint16 and fitted.shape == (16, 16, 5) and (fitted == 40000).all()
    with pytest.raises(UserError, match="nothing to resize"):
        fit_image(np.zeros((0, 5, 3), np.uint8), (4, 4))


def test_rerun_replaces_the_corpus(root):
    write(root, make_samples(8, split=lambda i: "val" if i == 7 else "train"), shard_size=1)
    assert len(shard_urls(root, "toy", "train")) == 7
    old_extra = shard_urls(root, "toy", "train")[5]
    manifest = write(root, make_samples(3, seed=1, split=lambda i: "train"), shard_size=2, min_shards=1)
    assert list(manifest["splits"]) == ["train"] and manifest["splits"]["train"]["samples"] == 3
    assert not storage.exists(old_extra)
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert re.fullmatch(r"toy-train-[0-9a-f]{8}-000000\.tar", names[0]) and names[1] == names[0].replace("0.tar", "1.tar")
    assert storage.list_files(storage.join(root, "toy")) == ["manifest.json"] + [f"train/{n}" for n in names]
    assert verify_store(root) == []


def test_exception_inside_the_writer_keeps_the_previous_corpus(root):
    write(root, make_samples(4), shard_size=1)
    corpus_url = storage.join(root, "toy")
    before = {rel: storage.read_bytes(storage.join(corpus_url, rel)) for rel in storage.list_files(corpus_url)}
    with pytest.raises(RuntimeError, match="converter crashed"):
        with ShardWriter(root, "toy", shard_size=1) as w:
            for s in make_samples(6, seed=2):  # several samples spooled in the staging folder before the crash
                w.write(s)
            raise RuntimeError("converter crashed")
    after = {rel: storage.read_bytes(storage.join(corpus_url, rel)) for rel in storage.list_files(corpus_url)}
    assert after == before
    # An empty run raises and changes nothing either.
    with pytest.raises(StoreError, match="no samples written"):
        with ShardWriter(root, "toy"):
            pass
    assert storage.list_files(corpus_url) == sorted(before)


def test_writer_rejects_bad_samples_and_goes_on(tmp_path):
    root = str(tmp_path)
    good = make_samples(1, split=lambda i: "train")[0]
    with ShardWriter(root, "toy", classes=CLASSES) as w:
        w.write(good)
        for change, message in (
            ({"corpus": "other"}, "corpus 'other'"),
            ({"split": "a/b"}, "split name"),
            ({"split": "val", "label": 7}, "label 7 outside the 3 classes"),
            ({"split": "val", "image_id": "img.1"}, "no dots"),
            ({"split": "val", "image": np.zeros((2, 2, 2, 2), np.uint8)}, "expected"),
            ({}, "duplicate image_id in split 'train'"),
        ):
            with pytest.raises(UserError, match=message):  # a converter skips, counts and goes on
                w.write(Sample(**{**good.__dict__, **change}))
    manifest = read_manifest(root, "toy")
    assert list(manifest["splits"]) == ["train"] and manifest["splits"]["train"]["samples"] == 1
    assert verify_store(root) == []
    with pytest.raises(StoreError, match="corpus name"):
        ShardWriter(root, "../x")


def test_manifest_errors_name_the_url(tmp_path):
    root = str(tmp_path)
    with pytest.raises(StoreError, match=r"toy/manifest.json: not found"):
        read_manifest(root, "toy")
    write(root, make_samples(2, split=lambda i: "train"))
    with pytest.raises(StoreError, match=r"no split 'test' \(splits: train\)"):
        shard_urls(root, "toy", "test")
    path = tmp_path / "toy" / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest.json: not valid JSON"):
        read_manifest(root, "toy")
    path.write_text(json.dumps({"schema_version": 3, "splits": {}}))
    with pytest.raises(StoreError, match=r"manifest.json: schema_version 3, expected one of \[1, 2\]"):
        read_manifest(root, "toy")
    with pytest.raises(StoreError, match="no corpus here"):
        inspect_store(str(tmp_path / "toy" / "train"))


# ---- verify ----


def test_verify_names_truncated_corrupted_and_missing_shards(root, capsys):
    write(root, make_samples(8, split=lambda i: "train"), shard_size=2, min_shards=1)
    urls = shard_urls(root, "toy", "train")
    data = storage.read_bytes(urls[0])
    storage.write_bytes_atomic(urls[0], data[:1600])  # cut inside the first image member (after a 1 KiB .json)
    data = bytearray(storage.read_bytes(urls[1]))
    data[700] ^= 0xFF  # a byte inside the first member's data
    storage.write_bytes_atomic(urls[1], bytes(data))
    storage.delete(urls[3])

    bad = dict(verify_store(root))
    assert sorted(bad) == sorted([urls[0], urls[1], urls[3]])
    assert "not a readable tar" in bad[urls[0]] and "bytes, manifest says" in bad[urls[0]]
    assert "sha256 differs" in bad[urls[1]]
    assert bad[urls[3]] == "missing"

    assert main(["shards", "verify", root]) == 1
    err = capsys.readouterr().err
    assert all(f"BAD {u}" in err for u in bad) and urls[2] not in err


# ---- storage ----


def test_s3_multipart_upload_and_move(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "MULTIPART_BYTES", 5 * 2**20)  # S3's smallest part size
    data = np.random.default_rng(0).bytes(11 * 2**20)
    (tmp_path / "big.bin").write_bytes(data)
    url = f"s3://{s3_bucket}/big/one.bin"
    storage.put_file(str(tmp_path / "big.bin"), url)
    bucket, key = storage.split_s3(url)
    assert s3.s3_client().head_object(Bucket=bucket, Key=key)["ETag"].endswith('-3"')  # 3 parts
    storage.move(url, f"s3://{s3_bucket}/big/two.bin")
    assert storage.list_dir(f"s3://{s3_bucket}/big") == ["two.bin"]
    assert storage.read_bytes(f"s3://{s3_bucket}/big/two.bin") == data


def test_urls():
    assert storage.join("s3://b/p/", "c", "/manifest.json") == "s3://b/p/c/manifest.json"
    assert storage.join("shards", "c") == "shards/c"
    assert storage.split_url("s3://b/root/corpus/") == ("s3://b/root", "corpus")
    assert storage.split_url("s3://b/corpus") == ("s3://b", "corpus")
    assert storage.split_url("corpus") == (".", "corpus")
    assert storage.split_s3("s3://b/a/b/") == ("b", "a/b")
    with pytest.raises(StoreError, match="no bucket name"):
        storage.split_s3("s3:///x")


def test_missing_local_path_and_bucket_are_one_line_errors(s3_bucket, tmp_path, capsys):
    with pytest.raises(StoreError, match=r"x\.tar: not found"):
        storage.read_bytes(str(tmp_path / "x.tar"))
    assert main(["shards", "inspect", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().endswith("nowhere: not found")

    with pytest.raises(StoreError, match=r"s3://.+/x\.tar: not found"):
        storage.read_bytes(f"s3://{s3_bucket}/x.tar")
    assert main(["shards", "verify", "s3://no-such-bucket-here/store"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bucket no-such-bucket-here does not exist" in err


def test_wrong_credentials_say_so_without_the_secret(s3_endpoint, monkeypatch, capsys):
    from botocore.stub import Stubber

    secret = "sEcReT-do-not-print-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # moto accepts any key, so the server's answers to a bad key are stubbed on the (new) client.
    with Stubber(s3.s3_client()) as stub:
        stub.add_client_error("head_object", service_error_code="403", http_status_code=403)
        stub.add_client_error(
            "get_object",
            service_error_code="SignatureDoesNotMatch",
            service_message=f"The request signature we calculated does not match the signature you provided ({secret})",
            http_status_code=403,
        )
        assert main(["shards", "inspect", "s3://bucket/store"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "access denied to s3://bucket/store/manifest.json" in err
        with pytest.raises(StoreError, match="check AWS credentials") as e:
            read_manifest("s3://bucket/store", "toy")
    assert secret not in err and secret not in str(e.value)


def test_unreachable_endpoint_names_it(monkeypatch, free_ports):
    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3, "_retry_budget_s", 0)  # no retries through the outage (tests/test_s3_outage.py)
    with pytest.raises(
        StoreError, match=rf"S3 endpoint http://127.0.0.1:{port} unreachable .* s3://b/c/manifest.json"
    ):
        storage.read_bytes("s3://b/c/manifest.json")


def test_local_writes_leave_no_temp_files(tmp_path):
    url = str(tmp_path / "d" / "f.json")
    storage.write_bytes_atomic(url, b"1")
    storage.write_bytes_atomic(url, b"22")
    assert storage.read_bytes(url) == b"22" and os.listdir(tmp_path / "d") == ["f.json"]
    storage.delete_prefix(str(tmp_path / "d"))
    assert not (tmp_path / "d").exists() and storage.list_files(str(tmp_path)) == []


def test_schema_2_tags_round_trip_and_schema_1_still_reads(tmp_path):
    samples = make_samples(4)
    for i, s in enumerate(samples):
        s.tags = ["trees", "road"] if i % 2 else []
    manifest = write(str(tmp_path), samples, min_shards=1)
    assert manifest["tags"] == ["road", "trees"]
    assert sum(s.get("tag_counts", {}).get("trees", 0) for s in manifest["splits"].values()) == 2
    decoded = {s.image_id: s for s in read_samples([str(u) for u in (tmp_path / "toy").rglob("*.tar")])}
    assert sorted(decoded[samples[1].image_id].tags) == ["road", "trees"]
    # A schema-1 manifest and record (no tags anywhere) still read, as having no tags.
    path = tmp_path / "toy" / "manifest.json"
    old = json.loads(path.read_text())
    old["schema_version"] = 1
    del old["tags"]
    path.write_text(json.dumps(old))
    assert read_manifest(str(tmp_path), "toy")["schema_version"] == 1
    record = samples[0].record()
    del record["tags"]
    assert validate_record(record) is record
    with pytest.raises(SchemaError, match="record field 'tags'"):
        validate_record({**record, "tags": "trees"})
