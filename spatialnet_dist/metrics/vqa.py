"""VQA accuracy as the RSVQA authors report it (the seed paper's Table II), and count regression errors.

An answer is right when the prediction maps to the same class as the true answer under a named rule
(spatialnet_dist.text.map_answer): 'rsvqa-lr' bins raw counts of `count` questions into 0, between 0
and 10, between 10 and 100, between 100 and 1000, more than 1000 (upper bounds inclusive) on both
sides, so a numeric prediction of 7 matches the answer 3; 'exact' compares normalised strings.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np

from spatialnet_dist.display import markdown_table
from spatialnet_dist.errors import UserError
from spatialnet_dist.metrics import (
    bootstrap_interval,
    name_some,
    percent,
    read_json,
    run_and_baselines,
    with_interval,
)
from spatialnet_dist.store.schema import QA_TYPES_KNOWN
from spatialnet_dist.text import ANSWER_RULES, map_answer

VQA_KEYS = ("qid", "type", "answer", "prediction")
TYPE_TITLES = {
    "count": "Count",
    "presence": "Presence",
    "comp": "Comparison",
    "rural_urban": "Rural/Urban",
    "area": "Area",
    "position": "Position",
}
log = logging.getLogger(__name__)


def _is_answer(value) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def check_vqa_rows(rows, name: str = "predictions") -> None:
    """Refuse a non-list, an empty list, rows without the four keys (named with the row index) and duplicate qids."""
    if not isinstance(rows, list):
        raise UserError(
            f'{name}: expected a list of {{"qid", "type", "answer", "prediction"}}, got {type(rows).__name__}'
        )
    if not rows:
        raise UserError(f"{name}: no predictions")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f'{name}: row {i} is not an object {{"qid", "type", "answer", "prediction"}}')
        missing = [k for k in VQA_KEYS if k not in row]
        if missing:
            raise UserError(f"{name}: row {i} lacks {', '.join(repr(k) for k in missing)}")
        if not (_is_answer(row["qid"]) and isinstance(row["type"], str)):
            raise UserError(f"{name}: row {i} needs a string or integer 'qid' and a string 'type'")
        for key in ("answer", "prediction"):
            if not _is_answer(row[key]):
                raise UserError(f"{name}: row {i} has {key} {row[key]!r}; expected a string or a number")
    counts = Counter(str(row["qid"]) for row in rows)
    duplicated = [q for q, n in counts.items() if n > 1]
    if duplicated:
        raise UserError(f"{name}: {len(duplicated)} qid(s) appear more than once: {name_some(duplicated)}")


def load_vqa_predictions(path: str | Path) -> list[dict]:
    """PRED `[{"qid", "type", "answer", "prediction"}]`, checked."""
    rows = read_json(path)
    check_vqa_rows(rows, str(path))
    return rows


def ordered_types(types) -> list[str]:
    """The schema's types in its order, then any others alphabetically (columns keep their place across runs)."""
    types = set(types)
    return [t for t in QA_TYPES_KNOWN if t in types] + sorted(types - set(QA_TYPES_KNOWN))


def score_vqa(rows: list[dict], count_rule: str = "rsvqa-lr") -> dict:
    """-> {"per_type": {type: accuracy}, "AA": mean of the per-type accuracies, "OA": accuracy over all,
    "AA_ci", "OA_ci": their 95% bootstrap intervals [lo, hi] over the questions, "n"}.

    rows: [{"qid", "type", "answer", "prediction"}]. A type outside the schema's known types is scored as
    a type of its own and named in a warning, never merged into another.
    """
    if count_rule not in ANSWER_RULES:
        raise UserError(f"count rule {count_rule!r} is not one of {', '.join(ANSWER_RULES)}")
    check_vqa_rows(rows)
    types = ordered_types(row["type"] for row in rows)
    unknown = [t for t in types if t not in QA_TYPES_KNOWN]
    if unknown:
        log.warning(
            "vqa: question type(s) %s are not among the known %s; each is scored as a type of its own",
            name_some(unknown),
            ", ".join(QA_TYPES_KNOWN),
        )
    correct = np.array([
        map_answer(row["answer"], row["type"], count_rule) == map_answer(row["prediction"], row["type"], count_rule)
        for row in rows
    ])  # (n,)
    type_of = np.array([types.index(row["type"]) for row in rows])  # (n,) index into `types`
    asked = np.bincount(type_of, minlength=len(types))  # (T,)
    right = np.bincount(type_of, weights=correct, minlength=len(types))  # (T,)
    per_type = {t: float(right[i] / asked[i]) for i, t in enumerate(types)}

    def mean_of_types(idx: np.ndarray) -> np.ndarray:  # (R, n) resampled questions -> (R,) AA
        cell = (np.arange(len(idx))[:, None] * len(types) + type_of[idx]).ravel()  # (R * n,) resample x type
        size = len(idx) * len(types)
        asked = np.bincount(cell, minlength=size).reshape(-1, len(types))  # (R, T)
        right = np.bincount(cell, weights=correct[idx].ravel(), minlength=size).reshape(-1, len(types))
        present = asked > 0  # a type a resample missed is left out of its mean, as score_vqa does
        return (right / np.maximum(asked, 1)).sum(1) / present.sum(1)

    return {
        "per_type": per_type,
        "AA": sum(per_type.values()) / len(per_type),
        "OA": float(correct.mean()),
        "n": len(rows),
        "AA_ci": bootstrap_interval(mean_of_types, len(rows)),
        "OA_ci": bootstrap_interval(lambda idx: correct[idx].mean(1), len(rows)),
    }


def format_vqa_table(scores: dict) -> str:
    """The paper's Table II columns: accuracy per question type, AA, OA, in percent (with 95% intervals).

    Each of scores["baselines"] ({key: the same shape plus a "name"}) is a row under this run's.
    """
    named = run_and_baselines(scores)
    types = ordered_types(t for _, s in named for t in s.get("per_type", {}))
    columns = [TYPE_TITLES.get(t, f"{t}*") for t in types] + ["AA", "OA"]

    def cells(s: dict) -> list[str]:
        return [percent(s["per_type"].get(t)) for t in types] + [
            with_interval(s.get("AA"), s.get("AA_ci")), with_interval(s.get("OA"), s.get("OA_ci"))
        ]

    if len(named) == 1:
        table = markdown_table(columns, [cells(scores)], numbers_from=0)
    else:
        table = markdown_table(["VQA", *columns], [[name, *cells(s)] for name, s in named])
    notes = [f"Accuracy in percent over {scores['n']} questions; AA: mean of the per-type accuracies, OA: over all."]
    if "OA_ci" in scores:
        notes.append("[lo, hi]: 95% bootstrap interval over the questions.")
    unknown = [t for t in types if t not in TYPE_TITLES]
    if unknown:
        notes.append(f"*: question type not in the RSVQA schema ({', '.join(unknown)}).")
    return table + "\n\n" + " ".join(notes)


def count_errors(pred_counts, true_counts) -> dict:
    """Count regression on raw counts: -> {"MAE", "RMSE", "n"}."""
    pred, true = [float(p) for p in pred_counts], [float(t) for t in true_counts]
    if len(pred) != len(true) or not pred:
        raise ValueError(
            f"count_errors needs as many predictions as true counts, at least one (got {len(pred)} and {len(true)})"
        )
    errors = [p - t for p, t in zip(pred, true)]
    return {
        "MAE": sum(abs(e) for e in errors) / len(errors),
        "RMSE": math.sqrt(sum(e * e for e in errors) / len(errors)),
        "n": len(errors),
    }


def format_count_table(scores: dict) -> str:
    """MAE and RMSE of the count regression head on raw counts (each of scores["baselines"] a row under it)."""
    rows = [[name, f"{s['MAE']:.3f}", f"{s['RMSE']:.3f}"] for name, s in run_and_baselines(scores)]
    table = markdown_table(["count regression", "MAE", "RMSE"], rows)
    return f"{table}\n\nErrors in objects, on raw counts of {scores['n']} count questions."
