"""A full disk is named (issue 30, item 3): on a real small tmpfs (conftest's `small_disk`), a checkpoint, a metric
line or a cached shard that finds no space left fails in one line naming the path and the free bytes of its
filesystem (errors.disk_full), the previous checkpoint stays whole and resumable, no partial file passes for a
complete one, and a shard cache that cannot grow falls back to streaming the same bytes from the store."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import pytest
import torch

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist.errors import DiskFull, UserError, disk_full, has_no_room
from spatialnet_dist.store import storage
from spatialnet_dist.train.rundir import RunDir
from tests.test_checkpoint import StandInTrainer, rank_files

FREE = r"\d+ bytes free of \d+ on its filesystem"


def test_the_one_line_names_the_path_and_the_free_space_of_its_nearest_existing_folder(small_disk):
    disk = small_disk.mount("256k")
    small_disk.fill(disk, leave=0)
    error = disk_full(disk / "not" / "yet" / "there.bin", "a test file")
    assert isinstance(error, UserError) and error.path == str(disk / "not" / "yet" / "there.bin")
    assert "\n" not in str(error)
    assert str(error).startswith(f"disk full: no space left writing a test file {disk}/not/yet/there.bin (")
    assert "0 bytes free of 262144 on its filesystem" in str(error)
    # torch.save on a full disk raises a RuntimeError without an errno: the disk itself is asked
    with pytest.raises(RuntimeError):
        torch.save(torch.zeros(100_000), disk / "weights.pt")
    assert has_no_room(disk) and not has_no_room(small_disk.tmp_path)
    import pickle

    again = pickle.loads(pickle.dumps(error))  # how Ray hands a worker's exception to the driver
    assert isinstance(again, DiskFull) and str(again) == str(error) and again.path == error.path


def test_a_full_disk_at_a_checkpoint_save_leaves_no_partial_one_and_the_one_before_resumes(small_disk, tmp_path):
    disk = small_disk.mount("1m")
    run = RunDir(str(disk / "run"))
    rank_files(tmp_path / "step4", 4)
    rank_files(tmp_path / "step8", 8)
    ckpt.publish(tmp_path / "step4", run.url, 4, rank=0, keep=0)
    ballast = small_disk.fill(disk, leave=4096)  # room for a file or two of the next save, not for all of them
    with pytest.raises(DiskFull, match=rf"^disk full: no space left writing {disk}/run/checkpoint-000008/\S+ \({FREE}\)$"):
        ckpt.publish(tmp_path / "step8", run.url, 8, rank=0, keep=0)
    assert [u for u, _ in ckpt.checkpoints(run.url)] == [run.path("checkpoint-000004")]  # the partial one removed
    assert not [p for p in (disk / "run").rglob("*") if p.name.endswith(".tmp")]  # no temp file left either
    trainer = StandInTrainer()
    assert ckpt.resume(trainer, run.url)["step"] == 4 and trainer.step == 4  # every file verified against its sha256
    # space freed, the rerun saves step 8 complete
    ballast.unlink()
    ckpt.publish(tmp_path / "step8", run.url, 8, rank=0, keep=0)
    assert ckpt.latest_complete(run.url) == run.path("checkpoint-000008")


def test_a_metric_line_that_does_not_fit_is_named_and_the_lines_before_stay_whole(small_disk):
    disk = small_disk.mount("64k")
    run = RunDir(str(disk / "run"))
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    before = (disk / "run" / "metrics.jsonl").read_bytes()
    small_disk.fill(disk, leave=0)
    with pytest.raises(DiskFull, match=rf"^disk full: no space left writing {disk}/run/metrics.jsonl \({FREE}\)$"):
        run.append_metrics({"step": 4, "loss": 0.25, "padding": "x" * 8192})
    assert (disk / "run" / "metrics.jsonl").read_bytes() == before and before.endswith(b"\n")
    assert [m["step"] for m in RunDir(run.url).metrics()] == [1, 2, 3]
    assert sorted(os.listdir(disk / "run")) == ["metrics.jsonl"] + [n for n in os.listdir(disk / "run")
                                                                     if n.startswith("ballast")]


def test_a_torn_last_metric_line_is_left_out_by_readers(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.append_metrics({"step": 1, "loss": 1.0})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # another writer's append cut off by a full disk
    assert [m["step"] for m in RunDir(run.url).metrics()] == [1]
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError):  # a bad line within the file is still an error, not skipped silently
        RunDir(run.url).metrics()


def _shard(n: int = 24, size: int = 20_000) -> bytes:
    """A tar shard of `n` samples (`<key>.bin` of `size` random bytes + `<key>.json`)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in range(n):
            for ext, data in ((".bin", os.urandom(size)), (".json", json.dumps({"i": i}).encode())):
                info = tarfile.TarInfo(f"s{i:03d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_shard_cache_that_cannot_grow_streams_the_same_samples_from_the_store(small_disk, s3_bucket, tmp_path,
                                                                                caplog):
    from spatialnet_dist.data.indexed import ShardReader

    body = _shard()
    (tmp_path / "shard.tar").write_bytes(body)
    urls = [f"s3://{s3_bucket}/c/train/c-train-00000{k}.tar" for k in range(2)]
    for url in urls:
        storage.put_file(str(tmp_path / "shard.tar"), url)
    cache = small_disk.mount("128k", "cache")  # a shard is ~500 KB: it cannot be cached
    local, cut_short = ShardReader(str(tmp_path / "roomy")), ShardReader(str(cache))
    with caplog.at_level(logging.WARNING, logger="spatialnet_dist.data.indexed"):
        for url in urls:
            assert len(cut_short.index(url).samples) == 24 and not cut_short.index(url).problem
            for position in (0, 23, 7, 7, 12):
                assert cut_short.sample(url, position) == local.sample(url, position)
    assert os.listdir(cache) == []  # no partial copy left, none taken for a cached shard
    assert len(os.listdir(tmp_path / "roomy")) == 2  # the roomy cache did cache them
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"the shard cache (data.cache_dir) {cache} (" in warnings[0] and "bytes free of 131072" in warnings[0]
    assert urls[0] in warnings[0] and "streaming" in warnings[0]
    cut_short.close()
    local.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_tensorboard_events_that_do_not_fit_are_named(small_disk):
    """The SummaryWriter writes in a thread of its own (which prints its OSError) and raises it at the next
    flush."""
    from spatialnet_dist.train.tracking import _TensorBoard

    disk = small_disk.mount("256k")
    tensorboard = _TensorBoard(RunDir(str(disk / "run")), purge_step=1)
    small_disk.fill(disk, leave=0)
    with pytest.raises(DiskFull, match=rf"^disk full: no space left writing TensorBoard events in {disk}/run/"
                                       rf"tensorboard \({FREE}\)$"):
        for step in range(1, 100):
            tensorboard.scalars(step, {"loss": 1.0, "a_long_tag_" * 20: 2.0})
            tensorboard.flush()
