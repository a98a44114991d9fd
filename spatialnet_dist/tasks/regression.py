"""regression: how many of an object the image holds (the count questions of the vqa corpora, answered
as a number). MSE on log1p(count); MAE, RMSE and exact-match of the rounded count in evaluation."""

from __future__ import annotations

import statistics
from typing import TypedDict

import torch
import torch.nn.functional as F

from spatialnet_dist.batch_format import QUESTIONS
from spatialnet_dist.metrics.baselines import training_text
from spatialnet_dist.metrics.vqa import count_errors, format_count_table
from spatialnet_dist.networks.heads import CountRegressionHead
from spatialnet_dist.symmetry import map_sides
from spatialnet_dist.tasks.base import Task, asked_of_every_image
from spatialnet_dist.tasks.vqa import question_texts
from spatialnet_dist.text import as_number


class RegressionBatch(TypedDict):
    image: torch.Tensor  # (B, C, S, S) float32
    image_id: list[str]  # [B]
    question: torch.Tensor  # (Q, Lq) int64 PAD-padded, per count question (Q: the B images' together)
    count: torch.Tensor  # (Q,) float32, the true count
    image_index: torch.Tensor  # (Q,) int64 in [0, B): the row of "image" the question is about


def predicted_counts(model, images: torch.Tensor, question: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """As vqa.answer_logits -> (Q,) predicted raw counts (the head regresses log1p(count))."""
    sub = {"image": images, "question": question, "image_index": image_index}
    return torch.expm1(model({"regression": sub})["regression"]["count_log1p"]).clamp(min=0)


class Regression(Task):
    name = "regression"
    former_names = ("count",)
    needs = "count questions"
    per_visit_key = "questions_per_image"
    asks_questions = True
    reads_words = True
    validation_keys = ("MAE",)
    report_heading = "Count regression"

    def has_content(self, manifest, split):
        return split.get("questions_by_type", {}).get("count", 0) > 0

    def epoch_rows(self, manifest, split):
        return split["questions_by_type"].get("count", 0)

    def texts(self, sample):
        return question_texts(sample, "count")

    def row(self, s, rows, rng, symmetry):
        counts = [q for q in s.qa if q["type"] == "count" and as_number(q["answer"]) is not None]
        questions = [{"question": rows.question(map_sides(q["question"], symmetry)), "count": as_number(q["answer"])}
                     for q in rows.picked(counts, rng)]
        return {QUESTIONS: questions} if questions else None

    def head(self, encoder_dim, preset, sizes, model_cfg, task_cfg):
        return CountRegressionHead(encoder_dim, sizes.words, question_dim=preset.text_dim // 2, hidden=preset.text_dim)

    def example_sub_batch(self, image, model_cfg):
        return {"image": image, "question": torch.ones(1, model_cfg.question_max_len, dtype=torch.long),
                "image_index": torch.zeros(1, dtype=torch.long)}

    def loss(self, out, sub, cfg, state):
        # log1p: counts span 0..thousands; on the raw scale the large ones would swamp every other loss.
        # A mean over the Q count questions, as for vqa.
        return F.mse_loss(out["count_log1p"].float(), torch.log1p(sub["count"].float()))

    def loss_size(self, sub):
        return len(sub["image_index"])

    def train_metrics(self, out, sub):
        pred = torch.expm1(out["count_log1p"].detach().float()).clamp(min=0)
        return {"regression_mae": (pred - sub["count"].float()).abs().mean()}

    def predict(self, model, sub, images, cfg, vocabs):
        question, index = sub["question"].to(images.device), sub["image_index"].to(images.device)  # (Q, Lq), (Q,)
        ids = [sub["image_id"][i] for i in sub["image_index"].tolist()]  # [Q]
        counts = predicted_counts(model, images, question, index).float().tolist()
        return [{"image_id": i, "count": float(c), "prediction": p} for i, c, p in zip(ids, sub["count"], counts)]

    def score(self, rows, cfg, vocabs):
        return count_errors([r["prediction"] for r in rows], [r["count"] for r in rows])

    def baselines(self, rows, cfg, vocabs):
        """"median": the training split's median count."""
        counts = training_text(cfg, vocabs, answers=[self.name]).counts
        if not counts:
            return {}
        median = statistics.median(counts)
        truth = [r["count"] for r in rows]
        return {"median": {**count_errors([median] * len(truth), truth), "name": f"training median count ({median:g})"}}

    def report_section(self, scores, out_dir):
        return [format_count_table(scores), ""]

    def infer(self, model, images, questions, question_texts, cfg, vocabs, class_probabilities):
        B, Qn = len(images), len(question_texts)
        counts = predicted_counts(model, images, *asked_of_every_image(questions, B)).float().view(B, Qn)  # (B, Qn)
        return [{"count": [{"question": q, "count": c} for q, c in zip(question_texts, cs)]} for cs in counts.tolist()]

    def infer_fields(self):
        import pyarrow as pa

        return [("count", pa.list_(pa.struct([("question", pa.string()), ("count", pa.float64())])))]


TASK = Regression()
