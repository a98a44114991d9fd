"""vqa: a question about the image answered from the answer vocabulary (RSVQA-LR). Cross-entropy per
question; overall and average accuracy per question type in evaluation."""

from __future__ import annotations

from typing import TypedDict

import torch

from spatialnet_dist.batch_format import QUESTIONS
from spatialnet_dist.metrics.baselines import majority_answers, question_only_answers, training_text
from spatialnet_dist.metrics.vqa import format_vqa_table, score_vqa
from spatialnet_dist.networks.heads import VQAHead
from spatialnet_dist.tasks.base import Task, asked_of_every_image, cross_entropy

REPORT_QUESTIONS = 3  # questions shown per sample image


class VQABatch(TypedDict, total=False):
    image: torch.Tensor  # (B, C, S, S) float32
    image_id: list[str]  # [B]
    question: torch.Tensor  # (Q, Lq) int64 PAD-padded, per question (Q: the B images' questions together)
    answer: torch.Tensor  # (Q,) int64, -1: outside the answer vocabulary
    qtype: list[str]  # [Q]
    qid: list[str]  # [Q]
    answer_raw: list[str]  # [Q]
    image_index: torch.Tensor  # (Q,) int64 in [0, B): the row of "image" the question is about


def answer_logits(model, images: torch.Tensor, question: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W), question (Q, Lq), image_index (Q,) in [0, B) -> (Q, A); one encoder pass per image."""
    sub = {"image": images, "question": question, "image_index": image_index}
    return model({"vqa": sub})["vqa"]["logits"]


def question_texts(s, kind: str | None = None) -> list[str]:
    """The questions and string answers of a sample (of one question type when `kind` is given)."""
    pairs = [q for q in s.qa if kind is None or q["type"] == kind]
    return [t for q in pairs for t in (q["question"], q["answer"]) if isinstance(t, str)]


class VQA(Task):
    name = "vqa"
    needs = "questions"
    per_visit_key = "questions_per_image"
    asks_questions = True
    reads_words = True
    reads_answers = True
    validation_keys = ("OA", "AA")
    headline_keys = ("OA", "AA")
    report_heading = "Visual question answering (Table II columns)"
    default_inference_place = 4

    def has_content(self, manifest, split):
        return split.get("questions", 0) > 0

    def epoch_rows(self, manifest, split):
        return split["questions"]

    def texts(self, sample):
        return question_texts(sample)

    def row(self, s, rows, rng, symmetry):
        questions = [
            {
                "question": rows.question(q["question"]),
                "answer": rows.vocabs.answers.encode(q["answer"], q["type"]),
                "qtype": q["type"],
                "qid": str(q["qid"]),
                "answer_raw": str(q["answer"]),
            }
            for q in (rows.seen(q, symmetry) for q in rows.picked(s.qa, rng))
        ]
        return {QUESTIONS: questions} if questions else None

    def head(self, encoder_dim, preset, sizes, model_cfg, task_cfg):
        return VQAHead(encoder_dim, preset, sizes.words, sizes.answers, model_cfg.question_max_len)

    def example_sub_batch(self, image, model_cfg):
        return {"image": image, "question": torch.ones(1, model_cfg.question_max_len, dtype=torch.long),
                "image_index": torch.zeros(1, dtype=torch.long)}

    def loss(self, out, sub, cfg, state):
        # A mean over the sub-batch's Q questions, not its images: loss.weights.vqa weighs a question's loss
        # the same however many questions each image visit answers.
        return cross_entropy(out["logits"], sub["answer"], ignore=-1)  # (Q, A) vs (Q,); -1: outside the vocabulary

    def loss_size(self, sub):
        return len(sub["image_index"])

    def predict(self, model, sub, images, cfg, vocabs):
        question, index = sub["question"].to(images.device), sub["image_index"].to(images.device)  # (Q, Lq), (Q,)
        ids = [sub["image_id"][i] for i in sub["image_index"].tolist()]  # [Q]
        best = answer_logits(model, images, question, index).argmax(-1).tolist()
        # The question as the model read it (vocabulary words; the raw text is not in the batch).
        asked = [vocabs.words.decode(q) for q in sub["question"].tolist()]
        return [
            {"qid": q, "type": t, "answer": a, "prediction": vocabs.answers.decode(b), "image_id": i, "question": text}
            for q, t, a, b, i, text in zip(sub["qid"], sub["qtype"], sub["answer_raw"], best, ids, asked)
        ]

    def row_key(self, row):
        return str(row["qid"])

    def score(self, rows, cfg, vocabs):
        return score_vqa(rows, cfg.eval.count_rule)

    def baselines(self, rows, cfg, vocabs):
        """"majority": the training split's most frequent answer per question type; "question_only": the
        most frequent training answer to the same question (as the model reads it), else the type's majority."""
        text = training_text(cfg, vocabs, answers=[self.name], questions=[self.name])
        if not text.answers_by_type:
            return {}
        guesses = {"majority": (majority_answers(rows, text), "most frequent training answer per type")}
        if text.answers_by_question:
            answers = question_only_answers(rows, text, vocabs, cfg.model.question_max_len)
            guesses["question_only"] = (answers, "most frequent training answer to the question")
        return {
            key: {**score_vqa([{**r, "prediction": a} for r, a in zip(rows, answers)], cfg.eval.count_rule), "name": name}
            for key, (answers, name) in guesses.items()
        }

    def sample_fields(self, rows, vocabs):
        return {"qa": [{"question": r["question"], "answer": r["answer"], "prediction": r["prediction"]}
                       for r in rows[:REPORT_QUESTIONS]]}

    def report_section(self, scores, out_dir):
        return [format_vqa_table(scores), ""]

    def infer(self, model, images, questions, question_texts, cfg, vocabs, class_probabilities):
        B, Qn = len(images), len(question_texts)
        probs, best = answer_logits(model, images, *asked_of_every_image(questions, B)).float().softmax(-1).max(-1)
        return [{"answers": [{"question": q, "answer": vocabs.answers.decode(b), "probability": p}
                             for q, p, b in zip(question_texts, ps, bs)]}
                for ps, bs in zip(probs.view(B, Qn).tolist(), best.view(B, Qn).tolist())]  # (B*Qn,) -> [B][Qn]

    def infer_fields(self):
        import pyarrow as pa

        answer = pa.struct([("question", pa.string()), ("answer", pa.string()), ("probability", pa.float64())])
        return [("answers", pa.list_(answer))]


TASK = VQA()
