"""Evaluation: the seed paper's metrics (captions, VQA, classification, count regression) and run reports.

Every scorer returns plain floats in dicts that go straight into `metrics.json` and the job's RESULT
line; the `format_*_table` functions print them as the paper's tables do (percent, CIDEr x100).
"""

from __future__ import annotations

import json
from pathlib import Path

from spatialnet_dist.errors import UserError

_SHOWN = 3  # ids named in an error message before "... and N more"


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


def name_some(ids) -> str:
    """'a, b, c' or 'a, b, c and 4 more': enough ids to find the problem, one line whatever the count."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


def percent(fraction: float | None) -> str:
    """0.4512 -> '45.12'; None (no value) -> '-'. The paper prints every score this way."""
    return "-" if fraction is None else f"{100.0 * fraction:.2f}"


def markdown_table(headers: list[str], rows: list[list[str]], numbers_from: int = 1) -> str:
    """A pipe table with padded columns: readable in a terminal and in any Markdown viewer.

    Columns from index `numbers_from` on hold numbers and are right-aligned; the others read left to right.
    """
    headers = [str(h).replace("|", "\\|") for h in headers]
    rows = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return (
            "| "
            + " | ".join(c.rjust(w) if i >= numbers_from else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    rule = (
        "|"
        + "|".join("-" * (w + 1) + ":" if i >= numbers_from else ":" + "-" * (w + 1) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
