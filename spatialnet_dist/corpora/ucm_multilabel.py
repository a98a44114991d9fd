"""The UC Merced multi-label release (`LandUse_Multilabeled.txt`, Chaudhuri et al. 2018), merged into
UCM-captions as each image's `tags` (`spatialnet shards convert ucm-captions SRC OUT --tags FILE`).

    IMAGE\\LABEL<TAB>airplane<TAB>bare-soil<TAB>...<TAB>water     header: the label names (17 in the release)
    agricultural00<TAB>0<TAB>0<TAB>...<TAB>1                      one row of 0/1 per image

Tab-separated, Windows line endings. Row `<class><NN>` is image NN (00-99) of a UC Merced class (the
class folder's name: `tenniscourt`, not `tenniscourts`). UCM-captions numbers the same 2100 images class by
class in alphabetical order, so the row is UCM-captions' `k.tif` with k = 100 * c + NN + 1, c the class's
index in UCM_CLASSES: `agricultural00` -> `1.tif`, `tenniscourt99` -> `2100.tif`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from spatialnet_dist.corpora.base import tags_source_note
from spatialnet_dist.errors import UserError

HEADER = "IMAGE\\LABEL"
_ROW_NAME = re.compile(r"^([a-z]+)(\d{2})$")


@dataclass(frozen=True)
class MultiLabelTable:
    """The parsed table: `labels` in column order, `rows` row name -> the names of its 1-columns."""

    path: Path
    labels: list[str]
    rows: dict[str, list[str]]


def read_multilabel(path: Path, classes: list[str]) -> MultiLabelTable:
    """Parse FILE; anything malformed (header, a row's name, column count, a value other than 0/1, a row
    twice) is a UserError naming FILE and the line. `classes`: the UC Merced class names rows may start with."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: not found (the UC Merced multi-label table, LandUse_Multilabeled.txt)") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the multi-label table ({e.__class__.__name__})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"{path}: empty, expected the header {HEADER} and one row of 0/1 per image")
    header_line, header = lines[0]
    labels = [cell.strip() for cell in header.strip().split("\t")]  # a trailing tab adds no column
    if labels[0] != HEADER or len(labels) < 2 or not all(labels[1:]) or len(set(labels[1:])) != len(labels) - 1:
        raise UserError(f"{path}: line {header_line}: expected the header {HEADER} then distinct label names, "
                        f"tab-separated; got {header.strip()[:60]!r}")
    labels = labels[1:]
    rows: dict[str, list[str]] = {}
    for n, line in lines[1:]:
        cells = [cell.strip() for cell in line.strip().split("\t")]
        match = _ROW_NAME.match(cells[0])
        if not match or match[1] not in classes:
            raise UserError(f"{path}: line {n}: image {cells[0][:40]!r}: expected a UC Merced class name and a "
                            "two-digit index (agricultural00 ... tenniscourt99)")
        if len(cells) != len(labels) + 1:
            raise UserError(f"{path}: line {n}: {len(cells) - 1} values, expected {len(labels)} (one per label)")
        wrong = next((v for v in cells[1:] if v not in ("0", "1")), None)
        if wrong is not None:
            raise UserError(f"{path}: line {n}: value {wrong[:20]!r}, expected 0 or 1")
        if cells[0] in rows:
            raise UserError(f"{path}: line {n}: image {cells[0]!r} has a row already")
        rows[cells[0]] = [label for label, v in zip(labels, cells[1:]) if v == "1"]
    return MultiLabelTable(path, labels, rows)


def row_name(filename: str, classes: list[str], per_class: int) -> str | None:
    """UCM-captions' `k.tif` -> its row name (`1.tif` -> `agricultural00`, `per_class` images a class); None
    for a file of another name."""
    stem = Path(filename).stem
    if not stem.isdigit() or not 1 <= int(stem) <= per_class * len(classes):
        return None
    c, index = divmod(int(stem) - 1, per_class)
    return f"{classes[c]}{index:02d}"


def merge(
    table: MultiLabelTable, filenames: list[str], classes: list[str], per_class: int
) -> tuple[dict[str, list[str]], dict]:
    """-> ({filename: tags} for the files that have a row, the manifest's `tags_source` note (base.tags_source_note))."""
    tags, matched, without_row = {}, set(), []
    for filename in filenames:
        name = row_name(filename, classes, per_class)
        if name in table.rows:
            tags[filename] = table.rows[name]
            matched.add(name)
        else:
            without_row.append(filename)
    without_image = [name for name in table.rows if name not in matched]
    return tags, tags_source_note(table.path, table.labels, len(tags), without_row, without_image)
