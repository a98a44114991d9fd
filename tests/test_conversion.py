"""Conversion that scales out, and re-conversion that never leaves a mix: the same shards from one
process, N processes or Ray tasks; a kill at every step of a re-conversion leaves a complete corpus,
the previous one or (once the manifest is swapped) the new one."""

from __future__ import annotations

import numpy as np
import pytest
from test_store import CLASSES, contents, make_samples, read_samples, write

from spatialnet_dist.cli import main
from spatialnet_dist.store import sharding, storage
from spatialnet_dist.store.manifest import read_manifest, shard_urls
from spatialnet_dist.store.storage import StoreError
from spatialnet_dist.store.verify import verify_store
from spatialnet_dist.store.writer import ShardWriter


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """-> a function giving a fresh store root per name: local folders, or prefixes in one moto bucket."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return lambda name: f"s3://{bucket}/{name}"
    return lambda name: str(tmp_path / name)


def two_splits(i: int) -> str:
    return "test" if i % 4 == 0 else "train"


def test_workers_give_the_shards_of_one_process(store):
    samples = make_samples(80, split=two_splits)  # 3 encode blocks: their counts merge, their chunks keep write order
    one = write(store("one"), samples, min_shards=3)
    two = write(store("two"), samples, min_shards=3, workers=2)
    for split in ("train", "test"):
        assert contents(two, split) == contents(one, split)
        assert {**two["splits"][split], "shards": None} == {**one["splits"][split], "shards": None}
    assert {**two, "created": None, "splits": None} == {**one, "created": None, "splits": None}
    assert verify_store(store("two")) == []


@pytest.mark.slow
def test_ray_tasks_give_the_shards_of_one_process(store, shared_ray):
    """Local and S3: Ray tasks spool blocks into the store's staging folder and read them back by range."""
    import ray

    from spatialnet_dist.ray_cluster import connect_ray

    samples = make_samples(70, split=two_splits)
    one = write(store("one"), samples, min_shards=3)
    try:
        by_ray = write(store("ray"), samples, min_shards=3, use_ray=True)
        if store("x").startswith("s3://"):  # a task's failure is the conversion's one-line error, not Ray's traceback
            connect_ray()  # Ray running before the writer: it submits to this connection
            with pytest.raises(StoreError) as failed:
                write("s3://no-such-bucket-for-ray/store", samples[:3], use_ray=True)
            assert str(failed.value).startswith("bucket no-such-bucket-for-ray does not exist")
            assert "\n" not in str(failed.value)
    finally:
        ray.shutdown()
    for split in ("train", "test"):
        assert contents(by_ray, split) == contents(one, split)
    assert verify_store(store("ray")) == []
    assert [rel for rel in storage.list_files(storage.join(store("ray"), "toy")) if ".staging-" in rel] == []


def test_read_range(store):
    url = storage.join(store("r"), "spool.bin")
    storage.write_bytes_atomic(url, bytes(range(256)) * 4)
    assert storage.read_range(url, 250, 10) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    with pytest.raises(storage.NotFoundError, match="nothing.bin: not found"):
        storage.read_range(storage.join(store("r"), "nothing.bin"), 0, 1)


class Killed(BaseException):
    """The converting process died here: no later step reaches the store (not even a cleanup)."""


class Kill:
    """Wraps every step of a conversion that changes the store: a spool write, a shard write, the
    manifest write, each deletion. Records the steps done; at step number `at` (None: never) and at
    every step after it raises Killed, as a kill -9 would leave it."""

    STEPS = (
        (sharding, "write_spool"),
        (sharding, "cut_shard"),
        (storage, "write_bytes_atomic"),
        (storage, "delete"),
        (storage, "delete_prefix"),
    )

    def __init__(self, monkeypatch, at: int | None):
        self.at, self.done = at, []
        for module, name in self.STEPS:
            monkeypatch.setattr(module, name, self._step(name, getattr(module, name)))

    def _step(self, name, real):
        def step(*args, **kwargs):
            if self.at is not None and len(self.done) >= self.at:
                raise Killed(f"killed before {name} (step {self.at})")
            self.done.append(name)
            return real(*args, **kwargs)

        return step


def convert_new(root: str) -> None:
    with ShardWriter(root, "toy", classes=CLASSES, shard_size=2, min_shards=1, shuffle_seed=3) as w:
        for sample in make_samples(9, seed=1, split=two_splits):
            w.write(sample)


def stored_records(root: str) -> dict:
    manifest = read_manifest(root, "toy")
    return {
        split: sorted((s.image_id, str(s.record())) for s in read_samples(shard_urls(root, "toy", split, manifest)))
        for split in manifest["splits"]
    }


@pytest.mark.parametrize("store", ["local", pytest.param("s3", marks=pytest.mark.slow)], indirect=True)
def test_a_kill_at_every_step_of_a_reconversion_leaves_a_complete_corpus(store, monkeypatch):
    old_samples = make_samples(6, split=lambda i: "train" if i % 3 else "val")  # another split than the new
    write(store("model-old"), old_samples, shard_size=1)
    convert_new(store("model-new"))
    old, new = stored_records(store("model-old")), stored_records(store("model-new"))
    assert old != new and set(old) == {"train", "val"} and set(new) == {"train", "test"}

    with monkeypatch.context() as m:  # count the steps of one whole re-conversion
        write(store("count"), old_samples, shard_size=1)
        steps = Kill(m, at=None)
        convert_new(store("count"))
    # Spool blocks, then shards, then the manifest swap, then the deletions (old shards, a local staging folder).
    swap = steps.done.index("write_bytes_atomic")
    assert set(steps.done[:swap]) == {"write_spool", "cut_shard"} and steps.done.count("cut_shard") == 5
    assert set(steps.done[swap + 1 :]) <= {"delete", "delete_prefix"} and steps.done.count("delete") == 6

    survived = {"old": 0, "new": 0}
    for at in range(len(steps.done)):
        root = store(f"kill-{at}")
        write(root, old_samples, shard_size=1)
        with monkeypatch.context() as m, pytest.raises(Killed):
            Kill(m, at=at)
            convert_new(root)
        assert verify_store(root) == [], f"killed at step {at}"
        state = "new" if at > swap else "old"
        assert stored_records(root) == (new if state == "new" else old), f"killed at step {at}"
        survived[state] += 1
        convert_new(root)  # the next conversion completes and deletes every leftover
        listed = {f"{s}/{e['name']}" for s, v in read_manifest(root, "toy")["splits"].items() for e in v["shards"]}
        assert storage.list_files(storage.join(root, "toy")) == sorted(listed | {"manifest.json"})
        assert stored_records(root) == new and verify_store(root) == []
    assert survived == {"old": swap + 1, "new": len(steps.done) - swap - 1}


def test_workers_option_on_the_command_line(tmp_path, capsys):
    assert main(["shards", "convert", "ucm-captions", str(tmp_path), str(tmp_path / "out"), "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "spatialnet: error: --workers 0: must be at least 1"
    with pytest.raises(SystemExit):
        main(["shards", "convert", "ucm-captions", str(tmp_path), str(tmp_path / "out"), "--workers", "2", "--ray"])
    assert "not allowed with argument" in capsys.readouterr().err


# ---- --image-format: lossy formats, for a loader that keeps a GPU fed ----


def _images_of_every_kind() -> dict[str, np.ndarray]:
    """Smooth images (what JPEG and WebP are made for) of each kind the store holds, keyed by kind."""
    y, x = np.mgrid[0:32, 0:40]
    gradient = (4 * x + 3 * y).astype(np.uint8)  # (32, 40)
    rgb = np.stack([gradient, 255 - gradient, (2 * y).astype(np.uint8)], -1)  # (32, 40, 3)
    rgba = np.concatenate([rgb, np.full((32, 40, 1), 200, np.uint8)], -1)
    bands16 = (np.arange(32 * 40 * 5, dtype=np.uint16) * 7).reshape(32, 40, 5)
    return {"rgb": rgb, "gray": gradient[:, :, None], "rgba": rgba, "bands16": bands16}


@pytest.mark.parametrize("image_format,stored_as", [
    ("jpeg", {"rgb": "jpg", "gray": "jpg", "rgba": "png", "bands16": "npy"}),  # JPEG has no alpha
    ("webp", {"rgb": "webp", "gray": "png", "rgba": "webp", "bands16": "npy"}),  # WebP has no single band
])
def test_a_lossy_format_stores_the_images_it_holds_and_reads_back_near_the_original(tmp_path, image_format, stored_as):
    import tarfile

    from spatialnet_dist.store.schema import Sample

    images = _images_of_every_kind()
    samples = [Sample(corpus="toy", image_id=kind, split="train", image=image, label=0, label_name=CLASSES[0])
               for kind, image in images.items()]
    root = str(tmp_path / "store")
    manifest = write(root, samples, min_shards=1, image_format=image_format, quality=95)
    assert manifest["image_format"] == {"format": image_format, "quality": 95}
    (url,) = shard_urls(root, "toy", "train")
    with tarfile.open(url) as tar:
        members = dict(name.split(".", 1) for name in tar.getnames() if not name.endswith(".json"))
    assert members == stored_as
    for sample in read_samples([url]):  # the loader's decode (schema.decode_sample), whatever the member
        original = images[sample.image_id]
        assert sample.image.shape == original.shape and sample.image.dtype == original.dtype
        error = np.abs(sample.image.astype(float) - original).mean()
        assert error == 0 if members[sample.image_id] in ("png", "npy") else error < 3
    assert write(str(tmp_path / "png"), samples, min_shards=1)["image_format"] == {"format": "png"}


def test_image_format_on_the_command_line(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "folders"
    for label in ("field", "water"):
        (src / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(src / label / f"{label}{i}.png")
    out = tmp_path / "out"
    convert = ["shards", "convert", "imagefolder", str(src), str(out), "--min-shards", "1"]
    for option, line in ((["--image-format", "gif"], "--image-format 'gif': expected one of png, jpeg, webp"),
                         (["--image-format", "jpeg", "--quality", "0"], "--quality 0: expected an integer from 1 to 100")):
        assert main([*convert, *option]) == 2
        assert capsys.readouterr().err.strip() == f"spatialnet: error: {line}"
        assert not out.exists()  # refused before anything is written
    assert main([*convert, "--image-format", "jpeg", "--quality", "80"]) == 0
    capsys.readouterr()
    assert main(["shards", "inspect", str(out)]) == 0
    assert "imagefolder: 2 classes, no tags; 8-bit images as jpeg quality 80" in capsys.readouterr().out
    assert verify_store(str(out)) == []
