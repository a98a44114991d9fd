"""Visual question answering corpora in the RSVQA layout: RSVQA-LR, and RSVQA-HR with its own file
prefix and image folder.

    SRC/LR_split_<split>_images.json     {"images":    [{"id", "active", "questions_ids"}, ...]}
    SRC/LR_split_<split>_questions.json  {"questions": [{"id", "active", "question", "type", "answers_ids"}, ...]}
    SRC/LR_split_<split>_answers.json    {"answers":   [{"id", "active", "answer"}, ...]}
    SRC/Images_LR/<id>.tif

Every list spans the global ids of all splits; rows of other splits are `{"id", "active": false}`.
Rows are looked up by their "id", never by their position. Answers are kept as the source writes
them (counts stay raw numbers, as strings); binning is a named rule applied by data and evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from spatialnet_dist.corpora.base import BadRecord, ImageError, load_json, read_image, require_dir, safe_key
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.schema import Sample


@dataclass
class _Table:
    """One JSON file of a split: its rows by global id."""

    path: Path
    rows: dict


class RsvqaCorpus:
    """An RSVQA-style corpus: `prefix` of its JSON files, `image_dir` of `<id>.<ext>` images.
    `splits` must all be present; `optional_splits` are read when their files exist; `image_size`: see
    `base.Adapter`."""

    classes = None  # no land-use labels

    def __init__(
        self,
        name: str,
        description: str,
        prefix: str,
        image_dir: str,
        image_exts: tuple[str, ...] = ("tif",),
        splits: tuple[str, ...] = ("train", "val", "test"),
        optional_splits: tuple[str, ...] = (),
        bands: int = 3,
        image_size: tuple[int, int] | None = None,
    ):
        self.name = name
        self.description = description
        self.prefix = prefix
        self.image_dir = image_dir
        self.image_exts = image_exts
        self.splits = splits
        self.optional_splits = optional_splits
        self.bands = bands
        self.image_size = image_size

    def _path(self, src: Path, split: str, kind: str) -> Path:
        return src / f"{self.prefix}_{split}_{kind}.json"

    def records(self, src: Path) -> Iterator[Sample | BadRecord]:
        src = require_dir(Path(src), "corpus folder")
        present = [s for s in self.optional_splits if self._path(src, s, "images").exists()]
        splits = [*self.splits, *present]
        for split in splits:  # fail on a missing file now, before anything is read or written
            for kind in ("images", "questions", "answers"):
                if not self._path(src, split, kind).is_file():
                    raise UserError(f"{self._path(src, split, kind)}: not found (the {self.name} {split} {kind} file)")
        image_dir = require_dir(src / self.image_dir, "image folder")
        return self._records(src, splits, image_dir)

    def _table(self, src: Path, split: str, kind: str) -> _Table:
        path = self._path(src, split, kind)
        doc = load_json(path, f"{self.name} {split} {kind} file")
        rows = doc.get(kind) if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected an object with a {kind!r} list")
        by_id = {}
        for pos, row in enumerate(rows):
            if not isinstance(row, dict) or "id" not in row:
                raise UserError(f"{path}: {kind}[{pos}] has no 'id'")
            by_id[row["id"]] = row
        return _Table(path, by_id)

    def _records(self, src: Path, splits: list[str], image_dir: Path) -> Iterator[Sample | BadRecord]:
        for split in splits:  # one split in memory at a time: RSVQA-HR lists ~1M questions per split
            images = self._table(src, split, "images")
            questions = self._table(src, split, "questions")
            answers = self._table(src, split, "answers")
            for image_row in images.rows.values():
                if image_row.get("active", False):
                    yield self._record(split, image_row, images, questions, answers, image_dir)

    def _record(
        self, split: str, image_row: dict, images: _Table, questions: _Table, answers: _Table, image_dir: Path
    ) -> Sample | BadRecord:
        source_id = image_row["id"]
        record = f"{split} image {source_id}"
        qids = image_row.get("questions_ids")
        if not isinstance(qids, list) or not qids:
            return BadRecord(record, str(images.path), "no questions (questions_ids)")
        qa = []
        for qid in qids:
            q = questions.rows.get(qid)
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("type"), str):
                return BadRecord(record, str(questions.path), f"question {qid} is missing or has no question/type")
            answer_ids = q.get("answers_ids")
            a = answers.rows.get(answer_ids[0]) if isinstance(answer_ids, list) and answer_ids else None
            if not isinstance(a, dict) or a.get("answer") is None:
                problem = f"answer of question {qid} (answers_ids {answer_ids!r}) is missing"
                return BadRecord(record, str(answers.path), problem)
            qa.append({"qid": str(qid), "question": q["question"], "answer": str(a["answer"]), "type": q["type"]})
        candidates = [image_dir / f"{source_id}.{ext}" for ext in self.image_exts]
        image_path = next((p for p in candidates if p.is_file()), candidates[0])
        try:
            image = read_image(image_path, self.bands)
        except ImageError as e:
            return BadRecord(record, str(image_path), str(e))
        return Sample(
            corpus=self.name,
            image_id=safe_key(str(source_id)),
            split=split,
            image=image,
            qa=qa,
            meta={"source_id": source_id},
        )


RSVQA_LR = RsvqaCorpus(
    "rsvqa-lr",
    "RSVQA-LR: 772 Sentinel-2 RGB tiles of the Netherlands; count, presence, comp, rural_urban questions",
    prefix="LR_split",
    image_dir="Images_LR",
    image_size=(256, 256),
)
# RSVQA-HR (zenodo 6344367): USGS_split_* files beside Data/; the second test set (Philadelphia,
# another sensor) is the optional split `test_phili`. Releases differ on .tif / .png images.
RSVQA_HR = RsvqaCorpus(
    "rsvqa-hr",
    "RSVQA-HR: 10659 USGS 15 cm aerial RGB images; count, presence, comp, area questions",
    prefix="USGS_split",
    image_dir="Data",
    image_exts=("tif", "png"),
    optional_splits=("test_phili",),
)
