"""The baselines each evaluated task is shown beside: what guessing, the question alone or the image's
class alone score, with the same scorers as the model.

  captions        "fixed_caption": one caption for every image, the split's most frequent reference;
                  "class_oracle": each image gets the most frequent training caption of its true class
                  (what recognising the class alone reaches)
  vqa             "majority": the training split's most frequent answer per question type;
                  "question_only": the most frequent training answer to the same question (as the model
                  reads it), the type's majority for a question not asked in training
  classification  "majority": the split's most frequent class
  regression      "median": the training split's median count

Answers are counted as the metric compares them (eval.count_rule); ties go to the alphabetically first.
Per-type answer counts come from the manifests; questions and captions from the training shards' JSON
records, read once per evaluation (store.records: no image is decoded).
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter

from spatialnet_dist.errors import UserError
from spatialnet_dist.evaluate.captions import score_captions
from spatialnet_dist.evaluate.vqa import count_errors, score_vqa
from spatialnet_dist.text import TextVocabs, as_number, map_answer

log = logging.getLogger(__name__)


def most_frequent(counts: Counter):
    """The most counted key; a tie goes to the smallest key, so that the answer never depends on read order."""
    return min(counts, key=lambda k: (-counts[k], k))


def caption_text(caption: str) -> str:
    """A caption as the baselines compare and count it: lower case, single spaces."""
    return " ".join(caption.lower().split())


def question_text(question: str, vocabs: TextVocabs, max_len: int) -> str:
    """A question as the model reads it: its vocabulary words, rare ones as <unk>, cut at max_len.
    Idempotent, so that prediction rows (which hold this text) and raw training questions meet."""
    return vocabs.words.decode(vocabs.words.encode(question, max_len, bos_eos=False))


def _train_answer_counts(cfg) -> dict[str, Counter]:
    """{question type: {raw answer: n}} of the training split of the vqa corpora (from their manifests)."""
    from spatialnet_dist.data.vocab import task_corpora, train_split
    from spatialnet_dist.store.manifest import read_manifest

    counts: dict[str, Counter] = {}
    for corpus in task_corpora(cfg, ["vqa", "regression"]):
        split = train_split(read_manifest(cfg.data.root, corpus), corpus, cfg.data.root)
        for qtype, by_answer in split.get("answer_counts", {}).items():
            counts.setdefault(qtype, Counter()).update(by_answer)
    return counts


def _train_texts(cfg, vocabs: TextVocabs, tasks: list[str]) -> tuple[dict[tuple, Counter], dict[str, Counter]]:
    """One pass over the training records of the corpora feeding `tasks` ("captioning", "vqa") ->
    ({(type, question text): {answer class: n}}, {class name: {caption text: n}})."""
    from spatialnet_dist.data.vocab import TRAIN_SPLIT, task_corpora
    from spatialnet_dist.store.records import split_records

    answers: dict[tuple, Counter] = {}
    captions: dict[str, Counter] = {}
    vqa_corpora = task_corpora(cfg, ["vqa"]) if "vqa" in tasks else []
    caption_corpora = task_corpora(cfg, ["captioning"]) if "captioning" in tasks else []
    for corpus in dict.fromkeys([*vqa_corpora, *caption_corpora]):
        for record in split_records(cfg.data.root, corpus, TRAIN_SPLIT):
            if corpus in vqa_corpora:
                for q in record["qa"]:
                    asked = (q["type"], question_text(q["question"], vocabs, cfg.model.question_max_len))
                    answers.setdefault(asked, Counter())[map_answer(q["answer"], q["type"], cfg.eval.count_rule)] += 1
            if corpus in caption_corpora and record["label_name"] is not None:
                captions.setdefault(record["label_name"], Counter()).update(map(caption_text, record["captions"]))
    return answers, captions


def _caption_baselines(rows: list[dict], by_class: dict[str, Counter]) -> dict:
    refs = {r["image_id"]: r["references"] for r in rows}
    fixed = most_frequent(Counter(caption_text(ref) for r in rows for ref in r["references"]))
    out = {
        "fixed_caption": {
            **score_captions([{"image_id": r["image_id"], "caption": fixed} for r in rows], refs),
            "name": f"one fixed caption: {fixed!r}",
        }
    }
    if by_class:
        # An image whose class has no training caption gets the most frequent training caption of all.
        anywhere = most_frequent(sum(by_class.values(), Counter()))
        oracle = {name: most_frequent(counts) for name, counts in by_class.items()}
        guessed = [{"image_id": r["image_id"], "caption": oracle.get(r.get("label_name"), anywhere)} for r in rows]
        out["class_oracle"] = {
            **score_captions(guessed, refs),
            "name": "most frequent training caption of the true class",
        }
    return out


def _vqa_baselines(rows: list[dict], cfg, vocabs: TextVocabs, by_type: dict[str, Counter],
                   by_question: dict[tuple, Counter]) -> dict:
    rule = cfg.eval.count_rule
    majority = {}
    for qtype, by_answer in by_type.items():
        mapped: Counter = Counter()
        for raw, n in by_answer.items():
            mapped[map_answer(raw, qtype, rule)] += n
        majority[qtype] = most_frequent(mapped)
    out = {}
    if majority:
        guessed = [{**r, "prediction": majority.get(r["type"], "")} for r in rows]
        out["majority"] = {**score_vqa(guessed, rule), "name": "most frequent training answer per type"}
    if by_question:
        answer_of = {asked: most_frequent(counts) for asked, counts in by_question.items()}
        guessed = [
            {**r, "prediction": answer_of.get((r["type"], question_text(r["question"], vocabs, cfg.model.question_max_len)),
                                              majority.get(r["type"], ""))}
            for r in rows
        ]
        out["question_only"] = {**score_vqa(guessed, rule), "name": "most frequent training answer to the question"}
    return out


def trivial_baselines(rows: dict[str, list[dict]], cfg, vocabs: TextVocabs) -> dict:
    """{task: prediction rows} -> {"captions", "vqa", "classification", "regression": {baseline key: its
    scores (the task scorer's shape) and a "name"}} for the tasks with rows (see the module docstring).
    A store without a training split leaves out the baselines that need one, with a warning."""
    baselines: dict[str, dict] = {}
    text_tasks = [t for t in ("captioning", "vqa") if rows.get(t)]
    try:
        by_type = _train_answer_counts(cfg)
        by_question, by_class = _train_texts(cfg, vocabs, text_tasks) if text_tasks else ({}, {})
    except UserError as e:
        log.warning("no baselines from the training split: %s", e)
        by_type, by_question, by_class = {}, {}, {}
    if rows.get("captioning"):
        baselines["captions"] = _caption_baselines(rows["captioning"], by_class)
    if rows.get("vqa"):
        baselines["vqa"] = _vqa_baselines(rows["vqa"], cfg, vocabs, by_type, by_question)
    train_counts = [as_number(a) for a, n in by_type.get("count", {}).items() if as_number(a) is not None
                    for _ in range(n)]
    if rows.get("regression") and train_counts:
        median = statistics.median(train_counts)
        truth = [r["count"] for r in rows["regression"]]
        baselines["regression"] = {
            "median": {**count_errors([median] * len(truth), truth), "name": f"training median count ({median:g})"}
        }
    labels = [r["label"] for r in rows.get("classification", []) if r["label"] >= 0]
    if labels:
        share = Counter(labels).most_common(1)[0][1] / len(labels)
        baselines["classification"] = {
            "majority": {"accuracy": share, "n": len(labels), "name": "most frequent class of this split"}
        }
    return {task: b for task, b in baselines.items() if b}
