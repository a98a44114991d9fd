"""A run's config from its sources: the schema's defaults <- a YAML file <- `--set a.b=c` overrides (each value read
as YAML), then the value checks; and a resolved config (config.yaml, a checkpoint's meta.json) read back.

Errors are `ConfigError` with one line that names the file or `--set` and the key, so the CLI can print it and
exit before any worker starts.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from spatialnet_dist.config.checks import validate
from spatialnet_dist.config.coercion import merge
from spatialnet_dist.config.schema import Config
from spatialnet_dist.errors import ConfigError


def parse_override(text: str) -> tuple[str, object]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
    return key, value


def _nest(key: str, value) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, then validation. Raises ConfigError."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {p}{where}: not valid YAML") from None
        try:
            merge(cfg, data, Config)
            _choose_run_length(cfg, set(_dotted_keys(data)))
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    given = set()
    for text in overrides or []:
        key, value = parse_override(text)
        merge(cfg, _nest(key, value), Config)
        given.update(_dotted_keys(_nest(key, value)))
    _choose_run_length(cfg, given, "--set: ")
    return validate(cfg)


def _dotted_keys(data, prefix: str = ""):
    """{"train": {"max_steps": 5}} -> "train.max_steps"."""
    for key, value in data.items() if isinstance(data, dict) else ():
        yield f"{prefix}{key}"
        yield from _dotted_keys(value, f"{prefix}{key}.")


def _choose_run_length(cfg: Config, given: set[str], where: str = "") -> None:
    """train.max_steps and train.epochs are two ways to say how long a run is. A level (the YAML file,
    then the --set overrides) that gives one replaces what an earlier level (or the default) said with
    the other, so `--set train.epochs=3` works on a file that sets max_steps; one level giving both is an error."""
    steps = "train.max_steps" in given and cfg.train.max_steps > 0
    epochs = "train.epochs" in given and cfg.train.epochs > 0
    if steps and epochs:
        raise ConfigError(f"{where}config keys train.max_steps and train.epochs are both set; give one of them")
    if epochs:
        cfg.train.max_steps = 0  # train.plan.resolve computes it from the manifests
    elif steps:
        cfg.train.epochs = 0.0


def from_dict(data: dict) -> Config:
    """Rebuild a resolved config (from config.yaml or a checkpoint's meta.json)."""
    cfg = Config()
    merge(cfg, data, Config)
    return validate(cfg)
