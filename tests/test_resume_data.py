"""The training data order is a function of (seed, micro-batch, rank): a restore gives the batches of the
uninterrupted run bit for bit, whatever the loader workers; the global batch is the same for any number
of ranks; epochs visit every sample once; tasks reading the same corpora visit the same images; bad samples are replaced deterministically; S3 shards are read
through the node-local cache; and a killed run resumes to the parameters of an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import as_torchrun_worker, spawn_ranks

from spatialnet_dist.batch_format import IMAGE_KEY, IMAGE_ROW, IMAGES, task_images
from spatialnet_dist.data.batches import make_train_loader
from spatialnet_dist.data.order import TaskOrder, slot_pattern
from spatialnet_dist.data.vocab import build_vocabs
from spatialnet_dist.store.manifest import shard_urls
from spatialnet_dist.store.storage import StoreError
from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS
from tests.test_data import _damaged_store, deadline, make_cfg, take, write_corpus


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("order"))
    write_corpus(root, "toy", {"train": 12, "val": 4}, shard_size=5)  # shards of 5, 5, 2
    write_corpus(root, "big", {"train": 30, "val": 4}, shard_size=8, seed=1)
    return root


def assert_same(a, b, where: str = "batch") -> None:
    """Bit for bit: every tensor equal in dtype, shape and value; everything else equal."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("mode", ["together", "alternate"])
def test_batches_after_a_restore_equal_the_uninterrupted_ones_for_any_loader_workers(two_corpora, mode):
    cfg = make_cfg(two_corpora, ["toy", "big"], workers=0, batch_size=3)
    cfg.train.mode = mode
    vocabs = build_vocabs(cfg)
    uninterrupted = take(make_train_loader(cfg, vocabs, 1, 2), 6)
    for workers in (0, 1, 2):
        cfg.data.loader_workers = workers
        assert_same(take(make_train_loader(cfg, vocabs, 1, 2), 6), uninterrupted, f"{workers} workers")
        restored = make_train_loader(cfg, vocabs, 1, 2, start=3)
        assert_same(take(restored, 3), uninterrupted[3:], f"{workers} workers, restored at 3")
        assert restored.position()["micro_batches"] == 6


def test_a_pre_emptions_sigterm_to_the_loader_processes_is_left_to_their_worker(two_corpora):
    """A pre-emption may SIGTERM every process of a training worker at once: its loader processes live on and the
    batches keep coming, the uninterrupted ones (the worker checkpoints at its next step: train/preemption.py). The
    signal comes from another process (`kill`), as a platform's does: the loader's own terminate() of a worker that
    does not stop, from the parent, still ends it, so the parent's exit never waits on one."""
    import signal
    import subprocess

    cfg = make_cfg(two_corpora, ["toy", "big"], workers=2, batch_size=3)
    vocabs = build_vocabs(cfg)
    uninterrupted = take(make_train_loader(cfg, vocabs, 0, 1), 8)
    loader = make_train_loader(cfg, vocabs, 0, 1)
    try:
        with deadline(60):
            batches = [next(loader) for _ in range(2)]
            processes = loader._batches._workers  # the DataLoader iterator's worker processes
            subprocess.run(["kill", f"-{signal.SIGTERM.value}", *(str(p.pid) for p in processes)], check=True)
            batches += [next(loader) for _ in range(6)]  # more than the 2 x data.prefetch made before the signal
        assert_same(batches, uninterrupted)
        assert [p.exitcode for p in processes] == [None, None]
        processes[0].terminate()  # SIGTERM from the parent
        processes[0].join(timeout=30)
        assert processes[0].exitcode == 0
    finally:
        loader.close()


def test_the_global_batch_is_the_same_for_any_number_of_ranks(two_corpora):
    cfg = make_cfg(two_corpora, ["toy", "big"], workers=0)
    vocabs = build_vocabs(cfg)
    global_batches = {}
    for world in (1, 2, 3):
        for task in TASKS:
            getattr(cfg.tasks, task).batch_size = 6 // world
        per_rank = [take(make_train_loader(cfg, vocabs, rank, world), 3) for rank in range(world)]
        # micro-batch m of all ranks, in rank order: the global rows of m
        global_batches[world] = [{t: (sum((r[m][t]["image_id"] for r in per_rank), []),
                                      torch.cat([task_images(r[m], t) for r in per_rank]))
                                  for t in TASKS} for m in range(3)]
        assert make_train_loader(cfg, vocabs, 0, world).position()["rows"] == dict.fromkeys(TASKS, 0)
    for world in (2, 3):
        assert_same(global_batches[world], global_batches[1], f"{world} ranks")


def test_an_epoch_visits_every_sample_once_and_the_mix_follows_the_weights(two_corpora):
    one = TaskOrder(5, "vqa", [37], [1.0])
    epochs = [[one.sample(g)[1] for g in range(e * 37, (e + 1) * 37)] for e in range(3)]
    assert all(sorted(epoch) == list(range(37)) for epoch in epochs) and epochs[0] != epochs[1]

    cfg = make_cfg(two_corpora, ["toy"], workers=0, batch_size=4)  # 12 train samples: 3 micro-batches an epoch
    ids = [i for b in take(make_train_loader(cfg, build_vocabs(cfg), 0, 1), 6) for i in b["classification"]["image_id"]]
    assert sorted(ids[:12]) == sorted(ids[12:]) == sorted(f"toy_train_{i}" for i in range(12))

    weights = [3.0, 1.0, 0.5]
    assert [slot_pattern(weights).count(c) for c in range(3)] == [667, 222, 111]
    mixed = TaskOrder(5, "vqa", [10, 40, 7], weights)
    rows = [mixed.sample(g) for g in range(9000)]
    for corpus, share in enumerate((3 / 4.5, 1 / 4.5, 0.5 / 4.5)):
        mine = [i for c, i in rows if c == corpus]
        assert len(mine) / len(rows) == pytest.approx(share, abs=0.001)
        size = mixed.sizes[corpus]
        assert all(sorted(mine[k: k + size]) == list(range(size)) for k in range(0, len(mine) - size + 1, size))
    assert sum(c == 0 for c, _ in rows[:20]) in (13, 14)  # interleaved: no corpus waits for another's epoch


def test_tasks_reading_the_same_corpora_show_the_same_images_row_by_row(two_corpora):
    cfg = make_cfg(two_corpora, ["toy", "big"])
    cfg.tasks.regression.corpora = ["big"]  # another mix of corpora: an order of its own
    batches = take(make_train_loader(cfg, build_vocabs(cfg), 0, 1), 6)
    for b in batches:
        assert b["captioning"]["image_id"] == b["vqa"]["image_id"] and all(b["vqa"][IMAGE_KEY])
        assert b["captioning"][IMAGE_KEY] == b["vqa"][IMAGE_KEY]
        assert torch.equal(b["captioning"][IMAGE_ROW], b["vqa"][IMAGE_ROW])  # one image of the micro-batch's each
        assert torch.equal(task_images(b, "captioning"), task_images(b, "vqa"))  # the same symmetry too
        assert b["classification"][IMAGE_KEY] == [""] * 4  # strong crops and recolours: never shared
        assert len(b[IMAGES]) == 4 + 4 + 4  # captioning's and vqa's, classification's, regression's (other corpora)
        assert b["regression"]["image_id"] != b["vqa"]["image_id"]
    assert len({key.split("@")[1] for b in batches for key in b["vqa"][IMAGE_KEY]}) > 1  # drawn per row


def test_a_bad_sample_is_replaced_deterministically_and_counted(tmp_path):
    truncated, corrupted = _damaged_store(str(tmp_path))
    cfg = make_cfg(tmp_path, ["bad"], workers=0, batch_size=6)
    cfg.data.max_bad_fraction = 0.9
    vocabs = build_vocabs(cfg)
    runs = []
    for workers in (0, 2):
        cfg.data.loader_workers = workers
        loader = make_train_loader(cfg, vocabs, 0, 1)
        runs.append((take(loader, 8), loader.skipped))
    assert_same(runs[1][0], runs[0][0], "2 loader workers")
    assert runs[0][1] == runs[1][1] and all(runs[0][1][t] > 0 for t in TASKS)
    seen = {i for b in runs[0][0] for i in b["vqa"]["image_id"]}
    assert "bad_train_13" not in seen and {"bad_train_0", "bad_train_12", "bad_train_14"} <= seen
    assert all(len(b[t]["image_id"]) == 6 for b in runs[0][0] for t in TASKS)


def test_s3_shards_are_read_through_the_node_cache(two_corpora, s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}/store"
    write_corpus(root, "toy", {"train": 12, "val": 4}, shard_size=5)
    local, remote = make_cfg(two_corpora, ["toy"], workers=1), make_cfg(root, ["toy"], workers=1)
    remote.data.cache_dir = str(tmp_path / "cache")
    vocabs = build_vocabs(local)
    assert_same(take(make_train_loader(remote, vocabs, 0, 1), 4), take(make_train_loader(local, vocabs, 0, 1), 4))
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir())
    assert cached == [u.rsplit("/", 1)[1] for u in shard_urls(root, "toy", "train")]  # each downloaded once, whole

    missing = shard_urls(root, "toy", "train")[1]
    remote.data.cache_dir = str(tmp_path / "fresh")
    from spatialnet_dist.store import storage

    storage.delete(missing)
    with pytest.raises(StoreError, match=missing):
        take(make_train_loader(remote, vocabs, 0, 1), 4)


def test_a_node_cache_that_cannot_grow_streams_the_same_batches(two_corpora, s3_bucket, small_disk):
    """data.cache_dir on a full disk (a small tmpfs): the loader workers stream the shards from S3 instead,
    and the batches are the ones a local read gives (tests/test_disk_full.py: the reader's warning)."""
    root = f"s3://{s3_bucket}/store"
    write_corpus(root, "toy", {"train": 12, "val": 4}, shard_size=5)
    local, remote = make_cfg(two_corpora, ["toy"], workers=1), make_cfg(root, ["toy"], workers=1)
    cache = small_disk.mount("64k", "cache")
    small_disk.fill(cache, leave=4096)
    remote.data.cache_dir = str(cache)
    vocabs = build_vocabs(local)
    assert_same(take(make_train_loader(remote, vocabs, 0, 1), 4), take(make_train_loader(local, vocabs, 0, 1), 4))
    assert [p.name for p in cache.iterdir() if not p.name.startswith("ballast")] == []  # nothing partial kept


# ---- end to end: a killed run resumes to the parameters of an uninterrupted one ----

# mae beside the labelled tasks: its masks, like drop_path's, come from the RNG the Trainer reseeds every step.
E2E_TASKS = [*TASKS, "mae"]
E2E = ["model.image_size=32", "model.drop_path=0.1", "train.log_every=1", "eval.every=2", "eval.val_batches=1",
       "eval.at_end=false", "train.max_steps=4", "train.checkpoint_every=2", "train.cpus_per_worker=1",
       "optim.warmup_steps=1", "optim.lr=1e-3", "optim.grad_accum=2", "tasks.mae.enabled=true",
       *(f"tasks.{t}.batch_size=2" for t in E2E_TASKS)]


def _e2e_worker(rank: int, port: int, root: str, out: str, stage: int, loader_workers: int, part: str):
    """part 'killed': the run with faults.kind=exit, rank 0 dies after step 3 (checkpoint at 2). part 'resumed':
    the same run resumed to max_steps, then an uninterrupted run of the same config; rank 0 compares them and saves
    the resumed weights (the test compares the bundle exported from the last checkpoint with them)."""
    as_torchrun_worker(rank, 2, port)
    from spatialnet_dist import config as config_mod
    from spatialnet_dist import engine as ds
    from spatialnet_dist.evaluate.run import ValidationPass
    from spatialnet_dist.train.local import train

    def run(name: str, *extra: str):
        cfg = config_mod.load(None, [*E2E, f"data.root={root}", f"run.storage={out}", f"run.name={name}",
                                     f"train.zero_stage={stage}", f"data.loader_workers={loader_workers}", *extra])
        trainer = train(cfg, build_vocabs(cfg), str(Path(out, name)), rank, 2, ValidationPass)  # as jobs.py's
        return {k: v.detach().clone() for k, v in trainer.inference_model().state_dict().items()}, trainer

    ds.init_distributed(False)
    faults = ["faults.kind=exit", "faults.fail_at_step=3"]
    if part == "killed":
        run("killed", *faults)  # rank 0 exits at step 3; spawn_ranks then ends rank 1
        return
    (resumed, trainer), (uninterrupted, _) = run("killed", *faults), run("uninterrupted")
    # fp32 ZeRO-3 holds one fp32 copy of its partition: the optimizer's masters are the partitions.
    optimizer = trainer.engine.optimizer
    one_copy = stage != 3 or all(m.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for m, p in
                                 zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat))
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"one_copy": one_copy}))
    if rank == 0:
        differ = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
        Path(out, "result.json").write_text(json.dumps({"differ": differ, "n": len(resumed)}))
        torch.save(resumed, Path(out, "resumed.pt"))
    ds.close_distributed()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_parameters_of_an_uninterrupted_one(tmp_path, free_ports):
    """2 ranks under gloo, ZeRO-3 (the partitioned parameters: the hardest consolidation), a loader process per
    rank, mae beside the labelled tasks, validation with ZeRO-3's gathered parameters at each checkpoint: rank 0
    dies after step 3, the rerun resumes checkpoint 2 to the parameters of a run never killed (mae's masks and
    drop_path included); the last checkpoint holds both ranks' ZeRO shards, and the fp32 bundle `spatialnet
    export` consolidates from them holds those parameters. (ZeRO-2 under Ray, with SIGKILLs, lost nodes and S3:
    tests/test_chaos.py; ZeRO-2's export: tests/test_checkpoint.py; a restore for any number of loader
    processes: the first test of this file.)"""
    stage, loader_workers = 3, 1
    from torch.multiprocessing.spawn import ProcessException

    from spatialnet_dist.checkpoint_weights import load_model
    from spatialnet_dist.cli import main as cli_main
    from spatialnet_dist.corpora.synthetic import write_synthetic

    root = str(tmp_path / "shards")
    write_synthetic(root, images=40, seed=0, shard_size=10)
    out = str(tmp_path / "runs")
    with pytest.raises(ProcessException):  # rank 0 exits; rank 1 is ended
        spawn_ranks(_e2e_worker, args=(free_ports(1)[0], root, out, stage, loader_workers, "killed"), nprocs=2)
    assert sorted(p.name for p in Path(out, "killed").glob("checkpoint-*")) == ["checkpoint-000002"]
    spawn_ranks(_e2e_worker, args=(free_ports(1)[0], root, out, stage, loader_workers, "resumed"), nprocs=2)
    result = json.loads(Path(out, "result.json").read_text())
    assert result["n"] > 0 and result["differ"] == []
    checkpoint = Path(out, "killed", "checkpoint-000004")
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["stream"]["micro_batches"] == 8 and meta["samples_seen"] == dict.fromkeys(E2E_TASKS, 32)  # 8 x 2 x 2
    metrics = [json.loads(line) for line in Path(out, "killed", "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # none twice
    for m in (metrics[1], metrics[3]):  # validated on both ranks' gathered ZeRO-3 parameters, scored on rank 0
        assert {"val/classification_accuracy", "val/vqa_OA", "val/mae_loss"} <= set(m), m
    assert all(json.loads(Path(out, f"rank-{r}.json").read_text())["one_copy"] for r in range(2))
    files = {p.name for p in (checkpoint / "zero" / "ds").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} <= files

    assert cli_main(["export", str(checkpoint), str(tmp_path / "bundle")]) == 0
    exported, resumed = load_model(str(tmp_path / "bundle"))[0].state_dict(), torch.load(Path(out, "resumed.pt"))
    assert resumed.keys() == exported.keys() and all(torch.equal(resumed[k].float(), exported[k]) for k in resumed)
