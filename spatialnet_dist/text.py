"""Text: word vocabulary for captions and questions, answer vocabulary, named answer rules.

The vocabularies are built from training text (the manifests' word and answer counts), saved as
JSON files that travel with every checkpoint, and loaded back by evaluation and `predict`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
_WORD_RE = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words: 'A red-roofed House.' -> ['a', 'red', 'roofed', 'house']."""
    return _WORD_RE.findall(text.lower())


# ---- answer rules: how a raw answer (as stored in the shards) becomes an answer class ----

RSVQA_LR_COUNT_BINS = ("0", "between 0 and 10", "between 10 and 100", "between 100 and 1000", "more than 1000")


def as_number(answer) -> float | None:
    """A raw answer as a finite number ("12", 12, "12.0" -> 12.0), or None for words (and booleans)."""
    if isinstance(answer, bool):
        return None
    try:
        n = float(answer) if isinstance(answer, (int, float)) else float(str(answer).strip())
    except ValueError:
        return None
    return n if math.isfinite(n) else None


def rsvqa_lr_count_bin(answer) -> str:
    """The RSVQA-LR authors' count bins, upper bounds inclusive: 0 | (0,10] | (10,100] | (100,1000] | >1000.

    A non-numeric answer is returned normalised and unchanged (it is already a bin or a word).
    """
    n = as_number(answer)
    if n is None:
        return normalize_answer(answer)
    if n <= 0:
        return RSVQA_LR_COUNT_BINS[0]
    if n <= 10:
        return RSVQA_LR_COUNT_BINS[1]
    if n <= 100:
        return RSVQA_LR_COUNT_BINS[2]
    if n <= 1000:
        return RSVQA_LR_COUNT_BINS[3]
    return RSVQA_LR_COUNT_BINS[4]


def normalize_answer(answer) -> str:
    n = as_number(answer)
    if n is not None and n == int(n):
        return str(int(n))  # "12.0" and 12 -> "12"
    return " ".join(str(answer).strip().lower().split())


ANSWER_RULES = ("rsvqa-lr", "exact")


def map_answer(answer, qtype: str, rule: str) -> str:
    """Raw answer -> class string under a named rule ('rsvqa-lr' bins counts; 'exact' normalises only)."""
    if rule == "rsvqa-lr" and qtype == "count":
        return rsvqa_lr_count_bin(answer)
    if rule in ANSWER_RULES:
        return normalize_answer(answer)
    raise ValueError(f"unknown answer rule {rule!r} (expected one of {', '.join(ANSWER_RULES)})")


# ---- vocabularies ----


class Vocab:
    """Word vocabulary with PAD/BOS/EOS/UNK at ids 0..3; unknown words map to UNK."""

    def __init__(self, itos: list[str]):
        if tuple(itos[:4]) != SPECIALS:
            raise ValueError("vocabulary must start with <pad> <bos> <eos> <unk>")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, counts: Counter | dict, min_count: int = 1) -> Vocab:
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int, bos_eos: bool = True) -> list[int]:
        """-> exactly max_len ids: [BOS] words [EOS], truncated, padded with PAD."""
        ids = [self.stoi.get(w, UNK_ID) for w in words(text)]
        ids = [BOS_ID, *ids[: max_len - 2], EOS_ID] if bos_eos else ids[:max_len]
        return ids + [PAD_ID] * (max_len - len(ids))

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(self.itos[i] if i < len(self.itos) else UNK)
        return " ".join(out)


class AnswerVocab:
    """Answer classes (strings after the answer rule) <-> ids; the rule travels with it."""

    def __init__(self, answers: list[str], rule: str):
        self.itos = list(answers)
        self.stoi = {a: i for i, a in enumerate(self.itos)}
        self.rule = rule

    @classmethod
    def build(cls, counts: dict[str, dict[str, int]], rule: str, max_answers: int) -> AnswerVocab:
        """`counts`: {question type: {raw answer: count}}, as the manifests hold them."""
        mapped: Counter = Counter()
        for qtype, by_answer in counts.items():
            for raw, n in by_answer.items():
                mapped[map_answer(raw, qtype, rule)] += n
        kept = sorted(mapped, key=lambda a: (-mapped[a], a))[:max_answers]
        return cls(kept, rule)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, answer, qtype: str) -> int:
        """-> class id, or -1 when the answer is outside the vocabulary (ignored by the loss)."""
        return self.stoi.get(map_answer(answer, qtype, self.rule), -1)

    def decode(self, index: int) -> str:
        return self.itos[int(index)]


class TextVocabs:
    """Everything a model's inputs and outputs are indexed by: words, answers, land-use classes, tags.

    Saved together as `vocab.json` beside every checkpoint and export; one written before tags existed
    reads as no tags.
    """

    FILENAME = "vocab.json"

    def __init__(self, words: Vocab, answers: AnswerVocab, classes: list[str], tags: list[str] = ()):
        self.words = words
        self.answers = answers
        self.classes = list(classes)
        self.tags = list(tags)  # multi-label tag names, the tagging head's outputs in order

    def to_dict(self) -> dict:
        return {
            "words": self.words.itos,
            "answers": self.answers.itos,
            "answer_rule": self.answers.rule,
            "classes": self.classes,
            "tags": self.tags,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TextVocabs:
        return cls(Vocab(d["words"]), AnswerVocab(d["answers"], d["answer_rule"]), d["classes"], d.get("tags", []))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILENAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TextVocabs:
        path = Path(directory) / cls.FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no vocabulary file")
        return cls.from_dict(json.loads(path.read_text()))
