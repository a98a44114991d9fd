"""Writing a nested dict (a YAML file's, an override's) into a config's dataclasses: each key must be a field (an
unknown one names the closest valid key, a task's former name the name it has now) and each value is checked
against the field's annotation and coerced (ints where floats are expected, a string where a list of strings is).

Generic over dataclasses: it names no section, so both the schema (which rebuilds pickled task sections with it)
and the loader stand on it. Errors are `ConfigError` with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from spatialnet_dist.config.checks import check_renamed, closest
from spatialnet_dist.errors import ConfigError


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key {key}: expected {_describe(tp)}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads `1e-3` (no dot) as a string: accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return str(value).lower()  # YAML reads `true` as a bool; a string key (train.compile) takes it as written
        if not isinstance(value, str):
            raise bad
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item is str:
            value = [value]  # `--set tasks.vqa.corpora=rsvqa-lr` means a list of one
        if not isinstance(value, list):
            raise bad
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if isinstance(tp, types.UnionType):  # the first member that takes the value (train.num_workers: int | list)
        for member in typing.get_args(tp):
            try:
                return _coerce(key, value, member)
            except ConfigError:
                pass
        raise bad
    raise AssertionError(f"unhandled config type {tp}")


def _describe(tp) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_describe(member) for member in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping to {_type_name(typing.get_args(tp)[1])}"
    return {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}.get(
        _type_name(tp), _type_name(tp)
    )


def merge(obj, data: dict, root: type, prefix: str = "") -> None:
    """Write `data` (nested dict) into dataclass `obj`, checking keys and types. `obj` stands at `prefix` in a
    config of class `root`, whose keys an unknown key's error may suggest."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<top>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            check_renamed(prefix, key)
            raise ConfigError(f"unknown config key {full}{_suggest(full, prefix, hints, root)}")
        tp = hints[key]
        if _is_dataclass_type(tp):
            merge(getattr(obj, key), value, root, f"{full}.")
        elif typing.get_origin(tp) is dict:
            # Mappings merge: `--set loss.weights.vqa=2` changes one weight and keeps the others.
            setattr(obj, key, {**getattr(obj, key), **_coerce(full, value, tp)})
        else:
            setattr(obj, key, _coerce(full, value, tp))


def _suggest(full: str, prefix: str, hints: dict, root: type) -> str:
    return closest(full, [f"{prefix}{k}" for k in hints] + list(_all_keys(root())))


def _all_keys(obj, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _all_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"
