"""What a corpus's manifest says, built at a conversion's commit: the per-split counts that encode tasks
gather and the writer merges (`SplitCounts`), and the manifest document (`corpus_manifest`; its fields:
store/manifest.py, DESIGN.md CONTRACT: shards). Apart from store/writer.py, which schedules the work."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timezone

from spatialnet_dist.store.band_stats import BandStats
from spatialnet_dist.store.schema import FIT_RULE, SCHEMA_VERSION, Sample
from spatialnet_dist.text import words


class SplitCounts:
    """The counts of one split (or of one encode task's part of it): samples, captions, questions, tags, words,
    answers, band statistics, and its shards once written; `manifest` is its entry in the manifest."""

    def __init__(self):
        self.samples = self.captions = self.questions = self.resized = 0
        self.questions_by_type: Counter = Counter()
        self.tag_counts: Counter = Counter()  # images showing each tag
        self.word_counts: Counter = Counter()
        self.answer_counts: defaultdict[str, Counter] = defaultdict(Counter)
        self.shards: list[dict] = []
        self.band_stats = BandStats()  # partial sums: parallel writers merge them

    def add(self, sample: Sample) -> None:
        self.band_stats.add(sample.image)
        self.samples += 1
        self.captions += len(sample.captions)
        self.questions += len(sample.qa)
        self.tag_counts.update(set(sample.tags))
        for caption in sample.captions:
            self.word_counts.update(words(caption))
        for q in sample.qa:
            self.questions_by_type[q["type"]] += 1
            self.word_counts.update(words(q["question"]))
            self.answer_counts[q["type"]][str(q["answer"])] += 1

    def merge(self, other: SplitCounts) -> None:
        """Add the counts of another part of the split (one encode task's block)."""
        self.samples += other.samples
        self.captions += other.captions
        self.questions += other.questions
        self.resized += other.resized
        self.band_stats.merge(other.band_stats)
        self.questions_by_type.update(other.questions_by_type)
        self.tag_counts.update(other.tag_counts)
        self.word_counts.update(other.word_counts)
        for qtype, answers in other.answer_counts.items():
            self.answer_counts[qtype].update(answers)

    def manifest(self, fit_rule: str | None) -> dict:
        def by_count(counter: Counter) -> dict:
            return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

        resized = {"resized": {"rule": fit_rule, "count": self.resized}} if fit_rule else {}
        return {
            "samples": self.samples,
            "captions": self.captions,
            "questions": self.questions,
            "questions_by_type": dict(sorted(self.questions_by_type.items())),
            "tag_counts": dict(sorted(self.tag_counts.items())),
            **resized,
            **self.band_stats.manifest(),
            "shards": self.shards,
            "word_counts": by_count(self.word_counts),
            "answer_counts": {qtype: by_count(c) for qtype, c in sorted(self.answer_counts.items())},
        }


def tag_names(splits: dict[str, SplitCounts]) -> list[str] | None:
    """The corpus's label set for multi-label tagging: every tag any split's images carry, sorted; None when
    no image has tags (the corpus does not tag)."""
    names = sorted({t for counts in splits.values() for t in counts.tag_counts})
    return names or None


def corpus_manifest(
    corpus: str,
    source: str,
    classes: list[str] | None,
    tags_source: dict | None,
    shuffle_seed: int,
    image_size: tuple[int, int] | None,
    splits: dict[str, SplitCounts],
    image_format: str = "png",
    quality: int = 0,
) -> dict:
    """The manifest of a corpus whose splits hold `splits` (their shards written). `image_size`: the corpus's
    nominal size (images of another size were fitted by FIT_RULE, counted per split); `tags_source`: where
    the tags came from when a table beside the corpus gave them (corpora.base.tags_source_note); `image_format`
    and `quality`: how its 8-bit images were stored (the quality only for a lossy format)."""
    fit_rule = FIT_RULE if image_size is not None else None
    return {
        "schema_version": SCHEMA_VERSION,
        "corpus": corpus,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "classes": classes,
        "tags": tag_names(splits),
        **({"tags_source": tags_source} if tags_source is not None else {}),
        "shuffle_seed": shuffle_seed,
        "image_size": list(image_size) if image_size is not None else None,
        "image_format": {"format": image_format, **({"quality": quality} if image_format != "png" else {})},
        "splits": {split: counts.manifest(fit_rule) for split, counts in sorted(splits.items())},
    }
