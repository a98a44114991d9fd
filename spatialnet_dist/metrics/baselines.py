"""The baselines each evaluated task is shown beside: what guessing, the question alone or the image's
class alone score, with the same scorers as the model. Each task declares its own (tasks/<task>.py
`baselines`); this module holds what they learn from the training split, and evaluate/run.py's
`trivial_baselines` asks every evaluated task.

Answers are counted as the metric compares them (eval.count_rule); ties go to the alphabetically first.
Per-type answer counts come from the manifests; questions, captions and classes from the training shards' JSON
records, read once per evaluation (store.records: no image is decoded).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from spatialnet_dist.errors import UserError
from spatialnet_dist.store.manifest import TRAIN_SPLIT, read_manifest, task_corpora, train_split
from spatialnet_dist.store.records import split_records
from spatialnet_dist.text import TextVocabs, as_number, map_answer, words

log = logging.getLogger(__name__)


def most_frequent(counts: Counter):
    """The most counted key; a tie goes to the smallest key, so that the answer never depends on read order."""
    return min(counts, key=lambda k: (-counts[k], k))


def caption_text(caption: str) -> str:
    """A caption as the baselines count it: its words as the vocabulary reads them ('Sand and sea.' ->
    'sand and sea'), so that spellings of one caption are counted together."""
    return " ".join(words(caption))


def question_text(question: str, vocabs: TextVocabs, max_len: int) -> str:
    """A question as the model reads it: its vocabulary words, rare ones as <unk>, cut at max_len.
    Idempotent, so that prediction rows (which hold this text) and raw training questions meet."""
    return vocabs.words.decode(vocabs.words.encode(question, max_len, bos_eos=False))


@dataclass
class TrainingText:
    """What the baselines learn from the training split of the evaluated tasks' corpora."""

    answers_by_type: dict[str, Counter] = field(default_factory=dict)  # {type: {answer class: n}}
    answers_by_question: dict[tuple[str, str], Counter] = field(default_factory=dict)  # {(type, question text): ...}
    captions: Counter = field(default_factory=Counter)  # {caption text: n}, every training caption
    captions_by_class: dict[str, Counter] = field(default_factory=dict)  # {class name: {caption text: n}}
    classes: Counter = field(default_factory=Counter)  # {class name: training images}
    counts: list[float] = field(default_factory=list)  # the raw answers of count questions


def read_training_text(cfg, vocabs: TextVocabs, answers: Sequence[str] = (), questions: Sequence[str] = (),
                       captions: Sequence[str] = (), classes: Sequence[str] = ()) -> TrainingText:
    """What the baselines of tasks learn from their corpora's training split; each argument names the tasks
    (their `tasks.<task>.corpora`) to read one kind of text from: answer counts per type (and the raw count
    answers) from the manifests of `answers`' corpora; questions with their answers, captions and classes from one
    pass over the training records of the corpora of `questions`, `captions` and `classes`."""
    rule, root, text = cfg.eval.count_rule, cfg.data.root, TrainingText()
    for corpus in task_corpora(cfg, answers):
        for qtype, by_answer in train_split(read_manifest(root, corpus), corpus, root).get("answer_counts", {}).items():
            for raw, n in by_answer.items():
                text.answers_by_type.setdefault(qtype, Counter())[map_answer(raw, qtype, rule)] += n
                if qtype == "count" and as_number(raw) is not None:
                    text.counts += [as_number(raw)] * n
    question_corpora, caption_corpora = task_corpora(cfg, questions), task_corpora(cfg, captions)
    class_corpora = task_corpora(cfg, classes)
    for corpus in dict.fromkeys([*question_corpora, *caption_corpora, *class_corpora]):
        for record in split_records(root, corpus, TRAIN_SPLIT):
            if corpus in question_corpora:
                for q in record["qa"]:
                    asked = (q["type"], question_text(q["question"], vocabs, cfg.model.question_max_len))
                    text.answers_by_question.setdefault(asked, Counter())[map_answer(q["answer"], q["type"], rule)] += 1
            if corpus in caption_corpora:
                captions_read = [caption_text(c) for c in record["captions"]]
                text.captions.update(captions_read)
                if record["label_name"] is not None:
                    text.captions_by_class.setdefault(record["label_name"], Counter()).update(captions_read)
            if corpus in class_corpora and record["label_name"] is not None:
                text.classes[record["label_name"]] += 1
    return text


def majority_answers(rows: list[dict], text: TrainingText) -> list[str]:
    """The training split's most frequent answer of each row's question type ("" for a type never seen)."""
    majority = {qtype: most_frequent(counts) for qtype, counts in text.answers_by_type.items()}
    return [majority.get(r["type"], "") for r in rows]


def question_only_answers(rows: list[dict], text: TrainingText, vocabs: TextVocabs, max_len: int) -> list[str]:
    """The most frequent training answer to each row's question, else the majority answer of its type."""
    answer_of = {asked: most_frequent(counts) for asked, counts in text.answers_by_question.items()}
    return [
        answer_of.get((r["type"], question_text(r["question"], vocabs, max_len)), fallback)
        for r, fallback in zip(rows, majority_answers(rows, text))
    ]


def class_oracle_captions(rows: list[dict], text: TrainingText) -> list[dict]:
    """[{"image_id", "caption"}]: the most frequent training caption of each image's true class
    (row "label_name"); the most frequent of all for an image whose class has no training caption."""
    anywhere = most_frequent(text.captions)
    oracle = {name: most_frequent(counts) for name, counts in text.captions_by_class.items()}
    return [{"image_id": r["image_id"], "caption": oracle.get(r.get("label_name"), anywhere)} for r in rows]


def training_text(cfg, vocabs: TextVocabs, **tasks_of_kind: Sequence[str]) -> TrainingText:
    """read_training_text, or nothing (with a warning) for a store without a training split."""
    try:
        return read_training_text(cfg, vocabs, **tasks_of_kind)
    except UserError as e:
        log.warning("no baselines from the training split: %s", e)
        return TrainingText()
