"""Checkpoint layout, publishing a checkpoint complete or not at all, verified reading, resuming.

Below train/ (which saves, publishes and resumes) and spatialnet_dist.checkpoint_weights (what a checkpoint's or
bundle's weights are read as: the model for evaluate/, an exported bundle, pretraining), which read every file
through `local_copy`. Resharding is spatialnet_dist.engine's (the one module that imports deepspeed), imported only
when a checkpoint is loaded on another number of ranks than wrote it.

A checkpoint directory `<run dir>/checkpoint-NNNNNN/` (the same on the Ray and the torchrun paths,
on a local dir or S3):
  meta.json       step, samples seen per task, the data position ("stream": seed, micro-batches done, rows
                  per task; the same for every rank: data/batches.py), seeds, resolved config
  config.yaml     the resolved config, readable
  vocab.json      words, answers, classes (spatialnet_dist.text.TextVocabs)
  zero/ds/        DeepSpeed's files: mp_rank_00_model_states.pt and one ZeRO shard per rank
  ema.safetensors with optim.ema_decay only: the weights' moving average (fp32, the model's state_dict keys),
                  what a resume continues and what checkpoint_weights (load_model, export_bundle) gives
                  instead of the weights
  manifest.json   written last, once every rank's files are in place: every file's sha256 and size.
                  A checkpoint without it is partial (a save that died) and never resumed from.
Beside them `checkpoint-NNNNNN.damaged-K/`: a complete checkpoint whose files no longer matched its manifest when a
resume read it, set aside by that resume (`resume`, `set_aside`) and kept for inspection: no longer a checkpoint of
the run, so pruning neither counts nor deletes it, and a later save of the same step writes a new checkpoint-NNNNNN.
An inference bundle (checkpoint_weights.export_bundle): model.safetensors (fp32, consolidated, or the EMA) +
config.yaml + vocab.json + manifest.json. Nothing in a bundle is a pickle: it is the route for weights from elsewhere.

Loading (`local_copy`: resume, `eval run`, `predict`, `export`, fine-tuning from `model.pretrained`) checks
every listed file against its sha256 before anything reads it; DeepSpeed unpickles its .pt files
(weights_only=False), so a checkpoint without a manifest is refused. The manifest catches corruption and
partial writes, not a hostile author: take checkpoints from elsewhere only as bundles. A file that does not match
(`DamagedCheckpoint`) makes a resume fall back to the run's checkpoint before; everything else refuses it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tempfile
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from pathlib import Path, PurePosixPath

import torch.distributed as dist

from spatialnet_dist import config as config_mod
from spatialnet_dist.errors import DiskFull, UserError
from spatialnet_dist.store import storage
from spatialnet_dist.text import TextVocabs

META = "meta.json"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
ZERO_DIR = "zero"
ZERO_TAG = "ds"
BUNDLE_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
BUNDLE_FILES = (BUNDLE_WEIGHTS, CONFIG, TextVocabs.FILENAME)
_NAME = re.compile(r"checkpoint-(\d+)")
DAMAGED_NAME = re.compile(r"checkpoint-\d+\.damaged-\d+")  # set aside by `resume`: not a checkpoint of the run
CHUNK = 2**20  # bytes hashed at a time: memory stays flat whatever a file's size (a shard may be GBs)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


# ---- publishing: staged files, then the manifest ----


def file_digests(directory: str | Path, names: list[str] | None = None) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file below `directory` (or of `names` only)."""
    d = Path(directory)
    paths = [d / n for n in names] if names is not None else sorted(p for p in d.rglob("*") if p.is_file())
    out = {}
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        out[path.relative_to(d).as_posix()] = {"sha256": h.hexdigest(), "bytes": path.stat().st_size}
    return out


def write_manifest(url: str, files: dict[str, dict], **fields) -> None:
    storage.write_bytes_atomic(storage.join(url, MANIFEST), json.dumps({**fields, "files": files}, indent=1).encode())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def publish(local_dir: str | Path, run_url: str, step: int, rank: int, keep: int, best: str | None = None) -> str:
    """Every rank together: put this rank's checkpoint files (`local_dir`) into `<run_url>/checkpoint-N/`;
    once all ranks' files are there rank 0 writes the manifest, which makes the checkpoint complete, and
    prunes the run to `keep` complete checkpoints and `best` (`prune`). -> the checkpoint's URL. A full disk
    (errors.DiskFull, naming the file and the free space) leaves no checkpoint-N: its partial files are removed, and
    the run's checkpoints before it are untouched."""
    url = storage.join(run_url, checkpoint_name(step))
    mine = file_digests(local_dir)
    by_rank = [mine]
    if _distributed():
        by_rank = [None] * dist.get_world_size()
        dist.all_gather_object(by_rank, mine)
    # One upload per path, by the lowest rank that has it: with node-local storage DeepSpeed writes the
    # model states on each node's first rank.
    owner: dict[str, int] = {}
    for r, digests in enumerate(by_rank):
        for rel in digests:
            owner.setdefault(rel, r)
    try:
        for rel in sorted(rel for rel, r in owner.items() if r == rank):
            storage.put_file(str(Path(local_dir) / rel), storage.join(url, rel))
        if _distributed():
            dist.barrier()  # every rank's files are in place
        if rank == 0:
            write_manifest(url, {rel: by_rank[r][rel] for rel, r in sorted(owner.items())}, step=step)
    except DiskFull:
        # No manifest, so never resumed from; removed now, so the space it took is free for the run's records (a
        # rank waiting at the barrier is ended with the group, and no manifest is written).
        if not storage.exists(storage.join(url, MANIFEST)):
            storage.delete_prefix(url)
        raise
    if rank == 0:
        prune(run_url, keep, best)
    return url


def checkpoints(run_url: str) -> list[tuple[str, bool]]:
    """(URL, complete) of every checkpoint directory of the run, oldest first."""
    try:
        names = [n for n in storage.list_dir(run_url) if _NAME.fullmatch(n)]
    except storage.NotFoundError:
        return []
    names.sort(key=lambda n: int(_NAME.fullmatch(n).group(1)))
    urls = [storage.join(run_url, n) for n in names]
    return [(u, storage.exists(storage.join(u, MANIFEST))) for u in urls]


def latest_complete(run_url: str) -> str | None:
    """The URL of the run's last complete checkpoint (what a resume tries first), or None."""
    complete = [u for u, ok in checkpoints(run_url) if ok]
    return complete[-1] if complete else None


def prune(run_url: str, keep: int, best: str | None = None) -> None:
    """Delete partial checkpoints (saves that died; nothing writes one while this runs: rank 0 calls it
    at the start of an attempt and after each save) and all but the last `keep` complete ones (0: all)
    and `best`, the URL of the best checkpoint (eval.keep_best), whatever its age. A damaged checkpoint set
    aside (DAMAGED_NAME) is none of these: never counted, never deleted."""
    found = checkpoints(run_url)
    complete = [u for u, ok in found if ok]
    kept = set(complete[-keep:] if keep else complete) | {best}
    for url, ok in found:
        if url in kept:
            continue
        if ok:  # manifest first: a deletion cut short leaves a partial checkpoint, never a hollow complete one
            storage.delete(storage.join(url, MANIFEST))
        storage.delete_prefix(url)


# ---- loading: every file checked before anything reads it ----


class DamagedCheckpoint(UserError):
    """A checkpoint file that is missing or does not match its manifest, or a manifest that cannot be read: what
    a resume passes over for the checkpoint before (`resume`). `file`: its path relative to the checkpoint."""

    def __init__(self, url: str, file: str, message: str):
        super().__init__(message)
        self.url, self.file = url, file


def listed_files(url: str) -> dict[str, dict | None]:
    """{relative path: digest} from the manifest; a bundle without one: its files, digest None."""
    manifest_url = storage.join(url, MANIFEST)
    if storage.exists(manifest_url):
        try:
            files = json.loads(storage.read_bytes(manifest_url))["files"]
            bad = [rel for rel in files if not isinstance(files[rel].get("sha256"), str)]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DamagedCheckpoint(url, MANIFEST, f"checkpoint {url}: {MANIFEST} is unreadable") from None
        if bad:
            raise DamagedCheckpoint(url, MANIFEST, f"checkpoint {url}: {MANIFEST} lists a bad entry: {bad[0]!r}")
        for rel in files:
            storage.check_relative(rel, f"checkpoint {url}: {MANIFEST}")
        return files
    if storage.exists(storage.join(url, BUNDLE_WEIGHTS)):
        return dict.fromkeys(BUNDLE_FILES)
    if storage.exists(storage.join(url, META)):
        raise UserError(f"checkpoint {url}: no {MANIFEST}: a partial save, or one whose files cannot be checked; "
                        f"refusing to unpickle it (a model from elsewhere loads as an exported bundle)")
    raise UserError(f"checkpoint {url}: not found (neither a checkpoint nor a bundle)")


def _fetch_checked(url: str, rel: str, digest: dict | None, dst: Path) -> None:
    """`url/rel` to `dst` (S3: a download; local: a link), refused unless its sha256 is the listed one."""
    src = storage.join(url, rel)
    h, size = hashlib.sha256(), 0
    try:
        with storage.open_stream(src) as f, open(dst, "wb") if storage.is_s3(url) else nullcontext() as out:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
    except storage.NotFoundError:
        raise DamagedCheckpoint(url, rel, f"checkpoint {url}: {rel} is missing") from None
    if digest is not None and (h.hexdigest() != digest["sha256"] or size != digest.get("bytes", size)):
        raise DamagedCheckpoint(url, rel, f"checkpoint {url}: {rel} does not match the sha256 recorded at save "
                                "(corrupt or altered); refusing to load it")
    if not storage.is_s3(url):
        dst.symlink_to(Path(src).resolve())


@contextmanager
def local_copy(url: str):
    """A checkpoint or bundle URL (local dir or s3://) as a local directory for the block, holding exactly
    the files its manifest lists, each checked against its sha256 first (local files are linked, not copied)."""
    files = listed_files(url)
    with tempfile.TemporaryDirectory(prefix="spatialnet-ckpt-") as tmp:
        for rel, digest in files.items():
            dst = Path(tmp, *PurePosixPath(rel).parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            _fetch_checked(url, rel, digest, dst)
        yield Path(tmp)


def resume(trainer, run_url: str, start_from: str = "", weights_only: bool = False) -> dict | None:
    """Restore `trainer` (every rank; anything with train.trainer.Trainer's `restore`) from the run's newest complete
    checkpoint that verifies, else, when the run has none, from `start_from` (train.resume). A damaged one
    (`DamagedCheckpoint`) is passed over for the one before it, never guessed at nor deleted: rank 0 sets it aside
    (`set_aside`) once its own restore is done (another rank reading it meanwhile finds it damaged or gone, and
    passes over it too). Refused in one line naming the newest damaged file when none verifies, and when
    `start_from` is damaged: the user named that one. -> what it resumed (`describe_resume`; "damaged": the
    checkpoints passed over, [{"checkpoint", "file", "reason", "set_aside"}]), or None: a fresh start or weights only."""
    complete = [u for u, ok in checkpoints(run_url) if ok]
    damaged: list[DamagedCheckpoint] = []
    with ExitStack() as stack:
        for url in reversed(complete):
            try:
                directory = stack.enter_context(local_copy(url))
                break
            except DamagedCheckpoint as e:
                damaged.append(e)
        else:
            if damaged:
                raise UserError(f"{damaged[0]}; none of the run's {len(damaged)} checkpoints verifies") from None
            if not start_from:
                return None
            url = start_from
            directory = stack.enter_context(local_copy(url))
        meta = read_meta(directory)
        trainer.restore(directory, weights_only=weights_only and not complete)
    if not complete and weights_only:
        return None
    passed_over = [{"checkpoint": e.url, "file": e.file, "reason": str(e),
                    "set_aside": set_aside(run_url, e.url) if trainer.rank == 0 else None} for e in damaged]
    written_by = int(meta.get("world_size", trainer.world_size))
    return {"checkpoint": url, "step": trainer.step, "written_by": written_by,
            "resharded": resharded(meta, trainer.world_size), "world_size": trainer.world_size,
            "samples_seen": dict(trainer.samples_seen), "damaged": passed_over}


def set_aside(run_url: str, url: str) -> str:
    """Move the run's checkpoint `url` out of its checkpoints, kept beside them as `<name>.damaged-K` (K = 1, 2, ...:
    a step saved again may be damaged again). Local: one rename; S3: object by object, the manifest last, so that
    what a crash leaves at `url` is still complete and is set aside by the next resume. -> its new URL."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    taken = set(storage.list_dir(run_url))
    aside = storage.join(run_url, next(f"{name}.damaged-{k}" for k in itertools.count(1)
                                       if f"{name}.damaged-{k}" not in taken))
    if not storage.is_s3(url):
        storage.move(url, aside)
        return aside
    for rel in sorted(storage.list_files(url), key=lambda rel: rel == MANIFEST):
        storage.move(storage.join(url, rel), storage.join(aside, rel))
    return aside


def damaged_checkpoints(run_url: str) -> list[str]:
    """The URLs of the damaged checkpoints set aside in the run directory (`set_aside`), by name."""
    return [storage.join(run_url, n) for n in storage.list_dir(run_url) if DAMAGED_NAME.fullmatch(n)]


def _checked_meta(url: str) -> dict:
    """A checkpoint's meta.json, checked against its manifest first (DamagedCheckpoint)."""
    with tempfile.TemporaryDirectory(prefix="spatialnet-meta-") as tmp:
        _fetch_checked(url, META, listed_files(url).get(META), Path(tmp, META))
        return read_meta(tmp)


def resumed_meta(run_url: str, start_from: str = "") -> dict | None:
    """The meta.json of the checkpoint a run would resume (`resume`), read before any worker starts; or None. Of
    the run's own, the newest whose meta.json verifies (the workers check the other files)."""
    complete = [u for u, ok in checkpoints(run_url) if ok]
    for url in reversed(complete):
        with suppress(DamagedCheckpoint):
            return _checked_meta(url)
    if complete or not start_from or not storage.exists(storage.join(start_from, META)):
        return None
    return json.loads(storage.read_bytes(storage.join(start_from, META)))


def describe_resume(resumed: dict) -> str:
    """The one line rank 0 logs at the start of a resumed attempt."""
    reshard = (f"resharded from {resumed['written_by']} to {resumed['world_size']} workers" if resumed["resharded"]
               else f"not resharded ({resumed['world_size']} workers)")
    seen = ", ".join(f"{t} {n}" for t, n in resumed["samples_seen"].items())
    return (f"resumed from {resumed['checkpoint']} at step {resumed['step']}, written by {resumed['written_by']} "
            f"workers, {reshard}; samples seen: {seen}")


def resharded(meta: dict, world_size: int) -> bool:
    """Whether a checkpoint must be resharded to load on `world_size` ranks: ZeRO 1-3 partition the optimizer
    state by rank; ZeRO-0 saves it whole and loads on any number."""
    stage = meta.get("config", {}).get("train", {}).get("zero_stage", 0)
    return stage > 0 and int(meta.get("world_size", world_size)) != world_size


@contextmanager
def zero_files(directory: str | Path, world_size: int, weights_only: bool = False):
    """-> (the DeepSpeed checkpoint folder to load on `world_size` ranks, whether it is universal) for the block.
    A checkpoint written by as many ranks, or weights only below ZeRO-3 (the module states are whole), loads
    as it is; else this rank converts it into DeepSpeed's universal
    form in a temporary directory of its own (the checkpoint itself is only read)."""
    d = Path(directory)
    meta = read_meta(d)
    if not resharded(meta, world_size) or (weights_only and meta["config"]["train"]["zero_stage"] < 3):
        yield str(d / ZERO_DIR), False
        return
    from spatialnet_dist.engine import to_universal

    with tempfile.TemporaryDirectory(prefix="spatialnet-universal-") as tmp:
        to_universal(str(d / ZERO_DIR), ZERO_TAG, tmp)
        yield tmp, True


def write_common(directory: str | Path, meta: dict, cfg: config_mod.Config, vocabs: TextVocabs,
                 ema: dict | None = None) -> None:
    """The files rank 0 adds beside the ZeRO shards; `ema`: the EMA's tensors (train/ema.py), when it has one."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / META).write_text(json.dumps({**meta, "config": cfg.to_dict()}, indent=1))
    (d / CONFIG).write_text(cfg.to_yaml())
    vocabs.save(d)
    if ema is not None:
        from safetensors.torch import save_file

        save_file(ema, str(d / EMA_WEIGHTS))


def ema_weights(directory: str | Path) -> dict | None:
    """The EMA's tensors a checkpoint holds (on the CPU), or None."""
    path = Path(directory) / EMA_WEIGHTS
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise UserError(f"{directory}: not a spatialnet checkpoint (no {META})")
    return json.loads(path.read_text())
