"""Driver-side checks before any worker starts: each raises a one-line UserError naming the key or file.

The config itself is checked when it loads (config.load: keys, types, ranges) and when the plan resolves
(train.plan.resolve: epochs, global batch sizes). What is left needs the world outside the config:
  check_java        java on PATH when captions are scored at the end (pycocoevalcap)
  check_sources     train.resume is a checkpoint; model.pretrained is a weights file, a checkpoint or a bundle
  check_manifests   every enabled task's corpora have a manifest with every split the run reads
                    (train; val when eval.every; eval.split when eval.at_end) and its shard files
  check_knn_corpus  eval.knn.corpus, when validation runs: a corpus with classes, its train and val shard files
  check_run_storage the run directory can be written
"""

from __future__ import annotations

from pathlib import Path

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist import tasks as registry
from spatialnet_dist import versions
from spatialnet_dist.checkpoint_weights import check_pretraining_source, is_pretraining_source
from spatialnet_dist.config import Config
from spatialnet_dist.errors import UserError
from spatialnet_dist.store import storage
from spatialnet_dist.store.manifest import TRAIN_SPLIT, manifest_url, read_manifest, shard_urls

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")  # what model.encoder.read_state_dict reads


def run_all(cfg: Config, run_url: str) -> None:
    check_java(cfg)
    check_sources(cfg)
    check_manifests(cfg)
    check_knn_corpus(cfg)
    check_run_storage(run_url)


def scoring_packages(cfg: Config) -> set[str]:
    """The versions.FEATURE_PACKAGES that the job's evaluation at the end imports to score its tasks
    (Task.score_packages); validation scores no task that needs one (none has validation_keys)."""
    enabled = cfg.tasks.enabled() if cfg.eval.at_end else []
    return {package for task in enabled for package in registry.get(task).score_packages}


def check_java(cfg: Config) -> None:
    if "pycocoevalcap" in scoring_packages(cfg):  # its PTB tokenizer and METEOR run on java
        versions.require_java()


def unused_packages(cfg: Config) -> list[str]:
    """The packages of versions.FEATURE_PACKAGES that this job never imports (versions.require_all's `unused`)."""
    urls = (cfg.data.root, cfg.run.storage, cfg.train.resume, cfg.model.pretrained)
    unused = ["pyproj"]  # spatialnet infer's alone
    scoring = scoring_packages(cfg)  # of the packages some task scores with
    unused += [p for p in dict.fromkeys(p for t in registry.all_tasks() for p in t.score_packages) if p not in scoring]
    if not any(storage.is_s3(url) for url in urls if url):
        unused.append("boto3")
    return unused


def check_sources(cfg: Config) -> None:
    resume = cfg.train.resume
    if resume and not storage.exists(storage.join(resume, ckpt.META)):
        raise UserError(f"train.resume: {resume}: not a spatialnet checkpoint (no {ckpt.META})")
    pretrained = cfg.model.pretrained
    if is_pretraining_source(pretrained):  # this project's pretraining: a complete checkpoint or a bundle
        check_pretraining_source(pretrained)
    elif pretrained and pretrained != "hub":  # hub: timm downloads it in the workers; nothing to check offline
        if not Path(pretrained).is_file():
            raise UserError(f"model.pretrained: {pretrained}: no such local file")
        if Path(pretrained).suffix not in WEIGHT_SUFFIXES:
            raise UserError(f"model.pretrained: {pretrained}: expected a {', '.join(WEIGHT_SUFFIXES)} file")


def splits_read(cfg: Config) -> list[str]:
    """The splits a run reads: train, val for periodic validation, the evaluation split at the end."""
    splits = ["train"]
    if cfg.eval.every:
        splits.append("val")
    if cfg.eval.at_end:
        splits.append(cfg.eval.split)
    return list(dict.fromkeys(splits))


def check_manifests(cfg: Config) -> None:
    from spatialnet_dist.data.streams import corpus_shards

    root = cfg.data.root
    listed: dict[str, set[str]] = {}  # split folder -> its files, listed once
    for task in cfg.tasks.enabled():
        for corpus in getattr(cfg.tasks, task).corpora:
            _check_converted(root, corpus, f"tasks.{task}.corpora")
            for split in splits_read(cfg):
                shards = corpus_shards(root, corpus, split, task)  # names the manifest and the split
                _check_shard_files(root, corpus, split, [s.url for s in shards.shards], listed)


def check_knn_corpus(cfg: Config) -> None:
    corpus, root = cfg.eval.knn.corpus, cfg.data.root
    if not corpus or not cfg.eval.every:
        return
    _check_converted(root, corpus, "eval.knn.corpus")
    manifest = read_manifest(root, corpus)
    if not manifest.get("classes"):
        raise UserError(f"eval.knn.corpus: corpus {corpus} under {root} has no classes; the kNN accuracy needs a "
                        "labelled corpus (image classes in its manifest)")
    for split in (TRAIN_SPLIT, "val"):
        urls = shard_urls(root, corpus, split, manifest)  # names the manifest and the split
        if not manifest["splits"][split].get("samples"):
            raise UserError(f"eval.knn.corpus: corpus {corpus} under {root} has no images in split {split!r}")
        _check_shard_files(root, corpus, split, urls, {})


def _check_converted(root: str, corpus: str, key: str) -> None:
    url = manifest_url(root, corpus)
    if not storage.exists(url):
        raise UserError(f"{key}: corpus {corpus}: no {url}; convert it first "
                        f"(spatialnet shards convert ADAPTER SRC {root} --name {corpus})")


def _check_shard_files(root: str, corpus: str, split: str, urls: list[str], listed: dict[str, set[str]]) -> None:
    """Every shard of `urls` is a file of the split's folder (`listed`: folder -> its files, filled on first use)."""
    folder = storage.join(root, corpus, split)
    if folder not in listed:
        listed[folder] = set(storage.list_files(folder))
    missing = [url for url in urls if url.rpartition("/")[2] not in listed[folder]]
    if missing:
        raise UserError(f"{missing[0]}: listed in {manifest_url(root, corpus)} but missing"
                        + (f" (and {len(missing) - 1} more in {folder})" if len(missing) > 1 else ""))


def check_run_storage(run_url: str) -> None:
    """Write and remove a probe: a missing bucket, a read-only folder or refused credentials stop here."""
    probe = storage.join(run_url, ".preflight-probe")
    try:
        storage.write_bytes_atomic(probe, b"")
        storage.delete(probe)
    except (OSError, storage.StoreError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"run.storage: cannot write {run_url} ({detail})") from None
