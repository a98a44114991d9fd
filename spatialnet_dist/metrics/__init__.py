"""Metrics: the seed paper's scorers (captions, VQA, classification, count regression), baselines and intervals.

Every scorer returns plain floats in dicts that go straight into `metrics.json` and the job's RESULT
line; the `format_*_table` functions print them as the paper's tables do (percent, CIDEr x100).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spatialnet_dist.errors import UserError

_SHOWN = 3  # ids named in an error message before "... and N more"
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
_BOOTSTRAP_CHUNK = 2**22  # resampled item indices held at once (32 MiB of int64), whatever the split's size


def read_json(path: str | Path):
    """Parsed JSON of a user's file; a missing or malformed file is a UserError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def bootstrap_interval(
    statistic: Callable[[np.ndarray], np.ndarray], n: int, level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
) -> list[float]:
    """The percentile bootstrap interval [lo, hi] of a statistic of n test items (questions, images).

    statistic: (R, n) item indices, each row one resample drawn with replacement -> (R,) values, e.g.
    `lambda idx: correct[idx].mean(1)`. The same seed and n give the same resamples, so intervals of
    several statistics of one split are paired and the same on every run.
    """
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _BOOTSTRAP_CHUNK // n)
    values = np.concatenate([
        statistic(rng.integers(0, n, size=(min(per_chunk, resamples - start), n)))
        for start in range(0, resamples, per_chunk)
    ])  # (resamples,)
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def with_interval(value: float | None, interval: list[float] | None = None) -> str:
    """0.45, [0.41, 0.49] -> '45.00 [41.00, 49.00]': a score in percent and its 95% interval when known."""
    shown = percent(value)
    return shown if interval is None else f"{shown} [{percent(interval[0])}, {percent(interval[1])}]"


def run_and_baselines(scores: dict) -> list[tuple[str, dict]]:
    """The rows of a table: ("this run", scores), then (name, its scores) for each of scores["baselines"]."""
    baselines = (scores.get("baselines") or {}).values()
    return [("this run", scores), *((b.get("name", "trivial baseline"), b) for b in baselines)]


def name_some(ids) -> str:
    """'a, b, c' or 'a, b, c and 4 more': enough ids to find the problem, one line whatever the count."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


def percent(fraction: float | None) -> str:
    """0.4512 -> '45.12'; None (no value) -> '-'. The paper prints every score this way."""
    return "-" if fraction is None else f"{100.0 * fraction:.2f}"
