"""`jsonl` and `csv`: any corpus described by a file of one record per image, with no code.

JSONL, one object per line (blank lines skipped); every field but `path` is optional:

    {"path": "tiles/a.tif",                  image file, relative to the JSONL file's folder (or absolute)
     "id": "a",                              image id (default: the file stem; letters, digits, '_', '-')
     "split": "train",                       default: drawn by --split-ratio (0.8,0.1,0.1) among records without one
     "label": "forest",                      class name (classes: --classes FILE's order, else the names sorted)
     "captions": ["A forest.", ...],         or one string
     "qa": [{"question": "Is there a road?", "answer": "yes", "type": "presence", "qid": "7"}, ...],
                                             type is required (count answers are numbers); qid defaults to <id>-<n>
     "tags": ["trees", "road"],              names of what the image shows (multi-label), or one string
     "meta": {...}}                          anything JSON, kept in the record's meta

CSV: a header row, then one row per image, with the same names as columns (`path` required, the
others optional, an empty cell is an absent field); `captions` and `tags` hold items separated by
`|`, `qa` the JSON list above. A line that cannot be used (malformed JSON, a missing path, an unknown
field, an unreadable image, another band count than the corpus's first image) is a bad record
naming the file and line.

A file of records with only `path` (and id, split, meta) converts as it is. With --unlabeled it is an
image-only corpus (pretraining): no classes, records without a split drawn into train and val by
--val-fraction (default 0.1, no test split), and a record with a label, captions, qa or tags is a bad
record (the images of an annotated corpus pretrain as that corpus: a task reads what it needs).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spatialnet_dist.corpora.base import BadRecord, ImageError, drawn_split_ratio, safe_key, split_by_ratio
from spatialnet_dist.corpora.imagefolder import ConsistentBands, load_classes
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.schema import Sample

FIELDS = ("path", "id", "split", "label", "captions", "qa", "tags", "meta")
ANNOTATIONS = ("label", "captions", "qa", "tags")  # the fields an --unlabeled corpus's records do not have
CSV_LIST_SEPARATOR = "|"


class RecordError(Exception):
    """A record that cannot become a sample; the message says why (the caller names file and line)."""


def _strings(value, key: str) -> list[str]:
    """A list of non-empty strings (one string is a list of one)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise RecordError(f"{key!r}: expected a string or a list of strings")
    return [v.strip() for v in items if v.strip()]


def _label_name(row: dict) -> str | None:
    """The record's class name: a string, or a number as text; None when absent or of another type."""
    label = row.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        return None
    return str(label)


def _qa(value, image_id: str) -> list[dict]:
    if not isinstance(value, list):
        raise RecordError("'qa': expected a list of {question, answer, type}")
    pairs = []
    for n, q in enumerate(value):
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("type"), str):
            raise RecordError(f"qa[{n}]: expected {{'question': str, 'answer', 'type': str}}")
        if not isinstance(q.get("answer"), (str, int, float)) or isinstance(q.get("answer"), bool):
            raise RecordError(f"qa[{n}]: 'answer' must be a string or a number")
        pairs.append({"qid": str(q.get("qid", f"{image_id}-{n}")), "question": q["question"], "answer": q["answer"],
                      "type": q["type"]})
    return pairs


@dataclass
class RecordFile:
    """See the module docstring: `format` is "jsonl" or "csv"; `split_ratio`, `split_seed`, `class_file`,
    `unlabeled` and `val_fraction` as for imagefolder."""

    format: str
    split_ratio: tuple[float, float, float] | None = None
    class_file: Path | None = None
    split_seed: int = 0
    unlabeled: bool = False
    val_fraction: float | None = None
    image_size: tuple[int, int] | None = None
    classes: list[str] | None = field(default=None, init=False)  # set by records(src)

    @property
    def name(self) -> str:
        return self.format

    @property
    def description(self) -> str:
        return (f"{self.format}: FILE of one record per image (path, any of label, captions, qa, tags, split); "
                "--unlabeled: path only")

    def records(self, src: Path) -> Iterator[Sample | BadRecord]:
        src = Path(src)
        if not src.is_file():
            raise UserError(f"{src}: not found (the {self.format} record file)")
        ratio = drawn_split_ratio(self.split_ratio, self.val_fraction, self.unlabeled)
        if self.unlabeled and self.class_file is not None:
            raise UserError(f"{src}: --classes: an --unlabeled corpus has no classes")
        rows = list(self._rows(src))  # [(line, dict or RecordError)]; no image is read yet
        parsed = [(line, row) for line, row in rows if isinstance(row, dict)]
        labels = {name for _, row in parsed if (name := _label_name(row)) is not None and not self.unlabeled}
        self.classes = load_classes(self.class_file, labels, "label", src) if labels or self.class_file else None
        unsplit = [line for line, row in parsed if not row.get("split")]
        drawn = dict(zip(unsplit, split_by_ratio(len(unsplit), ratio, self.split_seed)))
        return self._records(src, rows, drawn)

    def _rows(self, src: Path) -> Iterator[tuple[int, dict | RecordError]]:
        try:
            text = src.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{src}: not UTF-8 text at byte {e.start}") from None
        if self.format == "jsonl":
            for line, raw in enumerate(text.splitlines(), 1):
                if raw.strip():
                    try:
                        row = json.loads(raw)
                    except json.JSONDecodeError as e:
                        row = RecordError(f"malformed JSON at column {e.colno}: {e.msg}")
                    yield line, row if isinstance(row, (dict, RecordError)) else RecordError("expected a JSON object")
            return
        reader = csv.DictReader(text.splitlines())
        unknown = [c for c in reader.fieldnames or () if c not in FIELDS]
        if "path" not in (reader.fieldnames or ()) or unknown:
            problem = f"unknown column {unknown[0]!r}" if unknown else "no 'path' column"
            raise UserError(f"{src}: {problem} in the header (columns: {', '.join(FIELDS)})")
        for row in reader:
            yield reader.line_num, self._from_csv({k: v for k, v in row.items() if v not in (None, "")})

    @staticmethod
    def _from_csv(row: dict) -> dict | RecordError:
        for key in ("captions", "tags"):
            if key in row:
                row[key] = row[key].split(CSV_LIST_SEPARATOR)
        for key in ("qa", "meta"):
            if key in row:
                try:
                    row[key] = json.loads(row[key])
                except json.JSONDecodeError as e:
                    return RecordError(f"column {key!r}: malformed JSON at column {e.colno}: {e.msg}")
        return row

    def _records(self, src: Path, rows, drawn: dict[int, str]) -> Iterator[Sample | BadRecord]:
        reader = ConsistentBands()
        for line, row in rows:
            try:
                if isinstance(row, RecordError):
                    raise row
                yield self._sample(src, row, drawn.get(line), reader)
            except RecordError as e:
                yield BadRecord(f"line {line}", str(src), str(e))
            except ImageError as e:
                yield BadRecord(f"line {line}", str(src.parent / row["path"]), str(e))

    def _sample(self, src: Path, row: dict, drawn_split: str | None, reader: ConsistentBands) -> Sample:
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise RecordError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
        annotated = [key for key in ANNOTATIONS if key in row] if self.unlabeled else []
        if annotated:
            raise RecordError(f"field {annotated[0]!r}: an --unlabeled corpus's records hold images only "
                              "(path, id, split, meta)")
        if not isinstance(row.get("path"), str) or not row["path"]:
            raise RecordError("no 'path'")
        image_id = row.get("id", safe_key(Path(row["path"]).stem))
        split = row.get("split") or drawn_split
        for key, value in (("id", image_id), ("split", split)):
            if not isinstance(value, str) or not value or safe_key(value) != value:
                raise RecordError(f"{key} {value!r}: expected letters, digits, '_' or '-'")
        meta = row.get("meta", {})
        if not isinstance(meta, dict):
            raise RecordError("'meta': expected an object")
        label_name = _label_name(row)
        if label_name is None and row.get("label") not in (None, ""):
            raise RecordError(f"label {row['label']!r}: expected a class name (or a number)")
        captions = _strings(row.get("captions", []), "captions")
        qa = _qa(row.get("qa", []), image_id)
        tags = list(dict.fromkeys(_strings(row.get("tags", []), "tags")))  # each name once, in order
        image = reader.read(src.parent / row["path"])  # ImageError
        return Sample(
            corpus=self.name,
            image_id=image_id,
            split=split,
            image=image,
            label=None if label_name is None else self.classes.index(label_name),
            label_name=label_name,
            captions=captions,
            qa=qa,
            tags=tags,
            meta={**meta, "path": row["path"]},
        )
