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

from spatialnet_dist.errors import UserError
from spatialnet_dist.evaluate import markdown_table, name_some, percent, read_json
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
    """-> {"per_type": {type: accuracy}, "AA": mean of the per-type accuracies, "OA": accuracy over all, "n"}.

    rows: [{"qid", "type", "answer", "prediction"}]. A type outside the schema's known types is scored as
    a type of its own and named in a warning, never merged into another.
    """
    if count_rule not in ANSWER_RULES:
        raise UserError(f"count rule {count_rule!r} is not one of {', '.join(ANSWER_RULES)}")
    check_vqa_rows(rows)
    right: Counter = Counter()
    asked: Counter = Counter()
    for row in rows:
        qtype = row["type"]
        asked[qtype] += 1
        right[qtype] += map_answer(row["answer"], qtype, count_rule) == map_answer(row["prediction"], qtype, count_rule)
    unknown = [t for t in ordered_types(asked) if t not in QA_TYPES_KNOWN]
    if unknown:
        log.warning(
            "vqa: question type(s) %s are not among the known %s; each is scored as a type of its own",
            name_some(unknown),
            ", ".join(QA_TYPES_KNOWN),
        )
    per_type = {t: right[t] / asked[t] for t in ordered_types(asked)}
    return {
        "per_type": per_type,
        "AA": sum(per_type.values()) / len(per_type),
        "OA": sum(right.values()) / len(rows),
        "n": len(rows),
    }


def format_vqa_table(scores: dict, baseline: dict | None = None) -> str:
    """The paper's Table II columns: accuracy per question type, AA, OA, in percent.

    With `baseline` (the same shape, plus an optional "name"), a second row sits under this run's.
    """
    types = ordered_types([*scores["per_type"], *((baseline or {}).get("per_type") or {})])
    columns = [TYPE_TITLES.get(t, f"{t}*") for t in types] + ["AA", "OA"]

    def cells(s: dict) -> list[str]:
        return [percent(s["per_type"].get(t)) for t in types] + [percent(s.get("AA")), percent(s.get("OA"))]

    if baseline is None:
        table = markdown_table(columns, [cells(scores)], numbers_from=0)
    else:
        rows = [["this run", *cells(scores)], [baseline.get("name", "trivial baseline"), *cells(baseline)]]
        table = markdown_table(["VQA", *columns], rows)
    notes = [f"Accuracy in percent over {scores['n']} questions; AA: mean of the per-type accuracies, OA: over all."]
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


def format_count_table(scores: dict, baseline: dict | None = None) -> str:
    """MAE and RMSE of the count regression head on raw counts (baseline row under this run's when given)."""
    rows = [["this run", f"{scores['MAE']:.3f}", f"{scores['RMSE']:.3f}"]]
    if baseline is not None:
        rows.append([baseline.get("name", "trivial baseline"), f"{baseline['MAE']:.3f}", f"{baseline['RMSE']:.3f}"])
    table = markdown_table(["count regression", "MAE", "RMSE"], rows)
    return f"{table}\n\nErrors in objects, on raw counts of {scores['n']} count questions."
