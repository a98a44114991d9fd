"""Vocabularies of a run, built from the train-split counts that every corpus manifest holds.

Words come from the captions and questions of the corpora feeding the tasks that read words
(captioning, vqa and regression: `Task.reads_words`); answers from the corpora of the tasks that read
answers (vqa: `Task.reads_answers`) under the configured answer rule; land-use classes are the union of
the classification corpora's manifest `classes`, first corpus first, and a sample's label is found by its
`label_name` in that list; tags likewise from the tagging corpora's manifest `tags` (each corpus's sorted,
first corpus first): each the `Task.label_vocab` of its task.
"""

from __future__ import annotations

from collections import Counter

from spatialnet_dist import tasks as registry
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.manifest import read_manifest, task_corpora, train_split
from spatialnet_dist.text import AnswerVocab, TextVocabs, Vocab


def build_vocabs(cfg) -> TextVocabs:
    root = cfg.data.root
    manifests: dict[str, dict] = {}

    def manifest(corpus: str) -> dict:
        if corpus not in manifests:
            manifests[corpus] = read_manifest(root, corpus)
        return manifests[corpus]

    word_counts: Counter = Counter()
    for corpus in task_corpora(cfg, [t.name for t in registry.all_tasks() if t.reads_words]):
        word_counts.update(train_split(manifest(corpus), corpus, root).get("word_counts", {}))

    answer_counts: dict[str, Counter] = {}  # {question type: {raw answer: n}}
    for corpus in task_corpora(cfg, [t.name for t in registry.all_tasks() if t.reads_answers]):
        for qtype, by_answer in train_split(manifest(corpus), corpus, root).get("answer_counts", {}).items():
            answer_counts.setdefault(qtype, Counter()).update(by_answer)

    def label_names(task: str, key: str) -> list[str]:
        """The union of the `key` lists of `task`'s corpora's manifests, first corpus first."""
        out: list[str] = []
        for corpus in task_corpora(cfg, [task]):
            names = manifest(corpus).get(key)
            if not names:
                raise UserError(f"tasks.{task}.corpora: corpus {corpus} under {root} has no {key} in its manifest")
            out += [n for n in names if n not in out]
        return out

    labels = {t.label_vocab: label_names(t.name, t.label_vocab) for t in registry.all_tasks() if t.label_vocab}
    return TextVocabs(
        Vocab.build(word_counts, cfg.model.min_word_count),
        AnswerVocab.build(answer_counts, cfg.model.answer_rule, cfg.model.max_answers),
        **labels,  # classes, tags
    )
