"""What a checkpoint or an inference bundle is read as: its model's fp32 weights (consolidated from the ZeRO shards
of any stage, or its EMA), the model built from them, a bundle exported from a checkpoint, one hash naming its
content, and this project's checkpoints and bundles as model.pretrained.

Above spatialnet_dist.checkpoint, whose layout this reads and nothing there imports back: a function given a URL
reads it through checkpoint.local_copy (every file checked against its sha256 first); one given a directory
takes such a copy. Below train/ (fine-tuning's pretraining, the best checkpoint's weights at a run's end) and
evaluate/ (`load_model`: eval run, predict, infer), which never import each other. ZeRO consolidation is
spatialnet_dist.engine's (the one module that imports deepspeed), imported only where a checkpoint, not a
bundle, is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import yaml

from spatialnet_dist import config as config_mod
from spatialnet_dist.checkpoint import (
    BUNDLE_FILES,
    BUNDLE_WEIGHTS,
    CHUNK,
    CONFIG,
    MANIFEST,
    ZERO_DIR,
    ZERO_TAG,
    ema_weights,
    file_digests,
    latest_complete,
    listed_files,
    local_copy,
    write_manifest,
)
from spatialnet_dist.errors import UserError
from spatialnet_dist.store import storage
from spatialnet_dist.text import TextVocabs


def consolidated_weights(directory: str | Path) -> dict:
    """fp32 state dict of the model from a checkpoint of any ZeRO stage, or from a bundle."""
    d = Path(directory)
    if (d / BUNDLE_WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(str(d / BUNDLE_WEIGHTS))
    if not (d / ZERO_DIR / ZERO_TAG).is_dir():
        raise UserError(f"{directory}: neither a checkpoint ({ZERO_DIR}/{ZERO_TAG}/) nor a bundle ({BUNDLE_WEIGHTS})")
    from spatialnet_dist.engine import consolidated_state_dict

    return consolidated_state_dict(str(d / ZERO_DIR), ZERO_TAG)


def inference_weights(directory: str | Path) -> dict:
    """What a checkpoint is evaluated and exported with: its EMA when it holds one, else its weights."""
    ema = ema_weights(directory)
    return ema if ema is not None else consolidated_weights(directory)


def load_weights(model, url: str) -> None:
    """A checkpoint's (any ZeRO stage, any number of ranks) or a bundle's inference weights (its EMA when it
    holds one) into `model`."""
    with local_copy(url) as d:
        model.load_state_dict(inference_weights(d))


def is_pretraining_source(source: str) -> bool:
    """Whether model.pretrained names a checkpoint or bundle of this project (a local directory or an s3://
    URL), read by `pretraining_weights`, rather than a weights file or "hub", which the encoder reads."""
    return bool(source) and source != "hub" and (storage.is_s3(source) or Path(source).is_dir())


def check_pretraining_source(source: str) -> None:
    """A UserError naming `source` unless it is a complete checkpoint or a bundle; a run directory is told
    which checkpoint to name. Reads the manifest only."""
    if not (storage.exists(storage.join(source, MANIFEST)) or storage.exists(storage.join(source, BUNDLE_WEIGHTS))):
        latest = latest_complete(source)
        if latest is not None:
            raise UserError(f"model.pretrained: {source} is a run directory: name one of its checkpoints, "
                            f"e.g. {latest}")
    try:
        listed_files(source)
    except UserError as e:
        raise UserError(f"model.pretrained: {e}") from None


def pretraining_weights(source: str) -> dict | None:
    """model.pretrained as a pretraining of this project -> its model's weights, what the model-building code
    hands to networks/encoder.load_pretrained (which keeps the encoder): a checkpoint of any ZeRO stage (its
    EMA when it holds one, as `load_model` takes it) or an exported bundle, each file checked first. None
    when `source` is a weights file or "hub" (`is_pretraining_source`)."""
    if not is_pretraining_source(source):
        return None
    check_pretraining_source(source)
    with local_copy(source) as d:
        return inference_weights(d)


def load_config_and_vocabs(directory: str | Path) -> tuple[config_mod.Config, TextVocabs]:
    d = Path(directory)
    if not (d / CONFIG).is_file():
        raise UserError(f"{directory}: no {CONFIG} (not a checkpoint or bundle)")
    cfg = config_mod.from_dict(yaml.safe_load((d / CONFIG).read_text()))
    return cfg, TextVocabs.load(d)


def load_model(url: str):
    """-> (model in eval mode on CPU, cfg, vocabs) from a checkpoint (its EMA weights when it holds them)
    or a bundle URL."""
    from spatialnet_dist.model.spatialnet import build_model

    with local_copy(url) as d:
        cfg, vocabs = load_config_and_vocabs(d)
        state = inference_weights(d)
    # Under loss.balance=uncertainty the weights hold the learned task balance too: built, so the load stays strict.
    # The checkpoint's weights replace all of them: what model.pretrained named is not read (nor needed) again.
    model_cfg = dataclasses.replace(cfg.model, pretrained="")
    model = build_model(model_cfg, cfg.tasks.enabled(), vocabs, balance=cfg.loss.balance == "uncertainty",
                        task_cfgs=cfg.tasks)
    model.load_state_dict(state)
    return model.eval(), cfg, vocabs


def export_bundle(checkpoint_url: str, out_dir: str | Path) -> Path:
    """Consolidate any checkpoint (ZeRO-3 included) into fp32 safetensors (its EMA weights when it holds them)
    + config + vocab, and their manifest (written last)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with local_copy(checkpoint_url) as d:
        cfg, vocabs = load_config_and_vocabs(d)
        state = inference_weights(d)
    # safetensors refuses tensors that share storage (tied weights); contiguous copies are independent.
    save_file({k: v.detach().float().contiguous().clone() for k, v in state.items()}, str(out / BUNDLE_WEIGHTS))
    (out / CONFIG).write_text(cfg.to_yaml())
    vocabs.save(out)
    write_manifest(str(out), file_digests(out, list(BUNDLE_FILES)))
    return out


def model_sha256(url: str) -> str:
    """One sha256 naming a checkpoint's or bundle's content (what `spatialnet infer` records, so that its output
    never mixes two models): of its manifest, which holds every file's sha256; for a bundle without one, of its
    files' digests in turn."""
    files = listed_files(url)
    manifest_url = storage.join(url, MANIFEST)
    if storage.exists(manifest_url):
        return hashlib.sha256(storage.read_bytes(manifest_url)).hexdigest()
    h = hashlib.sha256()
    for rel in sorted(files):
        file_hash = hashlib.sha256()
        with storage.open_stream(storage.join(url, rel)) as f:
            while chunk := f.read(CHUNK):
                file_hash.update(chunk)
        h.update(f"{rel}\0{file_hash.hexdigest()}\n".encode())
    return h.hexdigest()
