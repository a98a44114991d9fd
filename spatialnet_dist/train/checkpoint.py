"""Checkpoint layout, the inference bundle, and loading a model back for evaluation.

A checkpoint directory (what every rank hands to `ray.train.report`; Ray merges the ranks' files):
  meta.json     step, samples seen per task, stream state, seeds, resolved config
  config.yaml   the resolved config, readable
  vocab.json    words, answers, classes (spatialnet_dist.text.TextVocabs)
  zero/ds/      DeepSpeed's files: mp_rank_00_model_states.pt and one ZeRO shard per rank
An inference bundle (`export_bundle`): model.safetensors (fp32, consolidated) + config.yaml + vocab.json.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from spatialnet_dist import config as config_mod
from spatialnet_dist.errors import UserError
from spatialnet_dist.store import storage
from spatialnet_dist.text import TextVocabs

META = "meta.json"
CONFIG = "config.yaml"
ZERO_DIR = "zero"
ZERO_TAG = "ds"
BUNDLE_WEIGHTS = "model.safetensors"


def write_common(directory: str | Path, meta: dict, cfg: config_mod.Config, vocabs: TextVocabs) -> None:
    """The files rank 0 adds beside the ZeRO shards."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / META).write_text(json.dumps({**meta, "config": cfg.to_dict()}, indent=1))
    (d / CONFIG).write_text(cfg.to_yaml())
    vocabs.save(d)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise UserError(f"{directory}: not a spatialnet checkpoint (no {META})")
    return json.loads(path.read_text())


@contextmanager
def local_copy(url: str):
    """A checkpoint or bundle URL (local dir or s3://) as a local directory for the block."""
    if not storage.is_s3(url):
        if not Path(url).is_dir():
            raise UserError(f"checkpoint {url}: not found")
        yield Path(url)
        return
    with tempfile.TemporaryDirectory(prefix="spatialnet-ckpt-") as tmp:
        names = storage.list_files(url)
        if not names:
            raise UserError(f"checkpoint {url}: not found")
        for name in names:
            dst = Path(tmp) / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(storage.read_bytes(storage.join(url, name)))
        yield Path(tmp)


def consolidated_weights(directory: str | Path) -> dict:
    """fp32 state dict of the model from a checkpoint of any ZeRO stage, or from a bundle."""
    d = Path(directory)
    if (d / BUNDLE_WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(str(d / BUNDLE_WEIGHTS))
    if not (d / ZERO_DIR / ZERO_TAG).is_dir():
        raise UserError(f"{directory}: neither a checkpoint ({ZERO_DIR}/{ZERO_TAG}/) nor a bundle ({BUNDLE_WEIGHTS})")
    from spatialnet_dist.train.engine import consolidated_state_dict

    return consolidated_state_dict(str(d / ZERO_DIR), ZERO_TAG)


def load_config_and_vocabs(directory: str | Path) -> tuple[config_mod.Config, TextVocabs]:
    d = Path(directory)
    if not (d / CONFIG).is_file():
        raise UserError(f"{directory}: no {CONFIG} (not a checkpoint or bundle)")
    cfg = config_mod.from_dict(yaml.safe_load((d / CONFIG).read_text()))
    return cfg, TextVocabs.load(d)


def load_model(url: str):
    """-> (model in eval mode on CPU, cfg, vocabs) from a checkpoint or a bundle URL."""
    from spatialnet_dist.model import build_model

    with local_copy(url) as d:
        cfg, vocabs = load_config_and_vocabs(d)
        state = consolidated_weights(d)
    model = build_model(cfg.model, cfg.tasks.enabled(), vocabs)
    model.load_state_dict(state)
    return model.eval(), cfg, vocabs


def export_bundle(checkpoint_url: str, out_dir: str | Path) -> Path:
    """Consolidate any checkpoint (ZeRO-3 included) into fp32 safetensors + config + vocab."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with local_copy(checkpoint_url) as d:
        cfg, vocabs = load_config_and_vocabs(d)
        state = consolidated_weights(d)
    # safetensors refuses tensors that share storage (tied weights); contiguous copies are independent.
    save_file({k: v.detach().float().contiguous().clone() for k, v in state.items()}, str(out / BUNDLE_WEIGHTS))
    (out / CONFIG).write_text(cfg.to_yaml())
    vocabs.save(out)
    return out
