"""tagging: which tag names appear in an image (multi-label, e.g. BigEarthNet or UC Merced multi-label).

Rows carry a multi-hot vector over the run's tag set (vocabs.tags: the union of the tagging corpora's
manifest `tags`); an image whose record has no tags (tags unknown) gives no row. A linear head on the
pooled image tokens gives one logit per tag, trained with binary cross-entropy (sigmoid), optionally
weighting each tag's positives by neg/pos of the training split (`tasks.tagging.pos_weight: true`), so
rare tags are not drowned by their negatives. With mixup/cutmix (data/mixing.py) a mixed row's targets
are its images' multi-hots weighted by their shares, lam t_i + (1 - lam) t_j (soft BCE targets).
Evaluation: average precision per tag, mAP macro (mean over the tags with a positive in the split) and
micro (all image-tag pairs as one ranking), F1 at a probability of 0.5 (micro and macro). Baseline:
every image scored with the training split's tag frequencies (what knowing only how common each tag
is reaches).

Frequencies count images with the tag out of the split's samples (the manifest's `tag_counts` and
`samples`): exact when every image of the tagging corpora is tagged.
"""

from __future__ import annotations

import logging
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spatialnet_dist.batch_format import own_rows
from spatialnet_dist.display import markdown_table
from spatialnet_dist.errors import UserError
from spatialnet_dist.metrics import run_and_baselines
from spatialnet_dist.store.manifest import TRAIN_SPLIT, read_manifest, task_corpora, train_split
from spatialnet_dist.tasks.base import MIX_OPTIONS, Task, tta_probabilities

log = logging.getLogger(__name__)

THRESHOLD = 0.5  # probability above which a tag is predicted, for F1


class TaggingBatch(TypedDict):
    image: torch.Tensor  # (B, C, S, S) float32
    image_id: list[str]  # [B]
    tags: torch.Tensor  # (B, T) float32 multi-hot over vocabs.tags; in [0, 1] in a mixed training micro-batch


class TaggingHead(nn.Module):
    """One logit per tag from the pooled image vector; the sigmoid is in the loss (and in prediction)."""

    def __init__(self, encoder_dim: int, num_tags: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(encoder_dim, num_tags)

    def forward(self, tokens, pooled, sub_batch) -> dict:
        return {"logits": self.fc(self.drop(own_rows(pooled, sub_batch)))}  # (B, T)


def tag_probabilities(model, images: torch.Tensor) -> torch.Tensor:
    """images (B, C, S, S) -> (B, T) each tag's probability."""
    return model({"tagging": {"image": images}})["tagging"]["logits"].float().sigmoid()


# ---- metrics ----


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """AP of one ranking: sum over score thresholds of (recall gain) x precision, tied scores counted
    as one threshold (as sklearn's average_precision_score); None without a positive."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order].astype(np.float64)
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]  # the last index of each score
    true_pos = np.cumsum(positive)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0.0, true_pos]) / n_pos
    return float((recall_gain * precision).sum())


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """F1 of boolean predictions against boolean truth (any shape, pooled); 0 when both are empty."""
    tp = float((pred & truth).sum())
    denominator = float(pred.sum() + truth.sum())
    return 2 * tp / denominator if denominator else 0.0


def score_tagging(scores: np.ndarray, truth: np.ndarray, tags: list[str]) -> dict:
    """scores (N, T) probabilities, truth (N, T) 0/1 -> {"mAP_macro", "mAP_micro", "F1", "F1_macro",
    "per_tag_AP": {tag: AP or None (no positive in the split)}, "n"}."""
    truth = truth.astype(bool)
    per_tag = [average_precision(scores[:, t], truth[:, t]) for t in range(len(tags))]
    known = [ap for ap in per_tag if ap is not None]
    pred = scores >= THRESHOLD
    return {
        "mAP_macro": float(np.mean(known)) if known else None,
        "mAP_micro": average_precision(scores.ravel(), truth.ravel()),
        "F1": f1(pred, truth),
        "F1_macro": float(np.mean([f1(pred[:, t], truth[:, t]) for t in range(len(tags)) if truth[:, t].any()]))
        if known else None,
        "per_tag_AP": dict(zip(tags, per_tag)),
        "n": int(len(truth)),
    }


def format_tagging_table(scores: dict) -> str:
    def cell(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    keys = ("mAP_macro", "mAP_micro", "F1", "F1_macro")
    summary = markdown_table(["tagging", *keys, "n"],
                             [[name, *(cell(s.get(k)) for k in keys), str(s.get("n", "-"))]
                              for name, s in run_and_baselines(scores)])
    per_tag = markdown_table(["tag", "AP"], [[tag, cell(ap)] for tag, ap in scores["per_tag_AP"].items()])
    return f"{summary}\n\nAverage precision per tag (this run):\n\n{per_tag}"


# ---- the training split's tag frequencies ----


def tag_frequencies(cfg, tags: list[str]) -> tuple[np.ndarray, int]:
    """-> ((T,) share of the training images showing each tag, training images) over the tagging corpora."""
    positives, images = np.zeros(len(tags)), 0
    index = {t: i for i, t in enumerate(tags)}
    for corpus in task_corpora(cfg, ["tagging"]):
        split = train_split(read_manifest(cfg.data.root, corpus), corpus, cfg.data.root)
        images += split["samples"]
        for tag, n in split.get("tag_counts", {}).items():
            if tag in index:
                positives[index[tag]] += n
    if images == 0:
        raise UserError(f"tasks.tagging.corpora: no images in their '{TRAIN_SPLIT}' splits")
    return positives / images, images


class Tagging(Task):
    name = "tagging"
    needs = "tags"
    label_vocab = "tags"
    default_enabled = False  # corpora with tags are few: a run asks for it
    options = {"pos_weight": False,  # weigh each tag's positives by neg/pos of the training split
               **MIX_OPTIONS}
    validation_keys = ("mAP_macro",)
    headline_keys = ("mAP_macro", "F1")
    report_heading = "Multi-label tagging"
    default_inference_place = 2

    def has_content(self, manifest, split):
        return bool(manifest.get("tags")) and sum(split.get("tag_counts", {}).values()) > 0

    def row(self, s, rows, rng, symmetry):
        if not s.tags:
            return None
        multi_hot = torch.zeros(len(rows.tag_index))
        multi_hot[[rows.tag_index[t] for t in s.tags if t in rows.tag_index]] = 1.0
        return {"tags": multi_hot}

    def head(self, encoder_dim, preset, sizes, model_cfg, task_cfg):
        return TaggingHead(encoder_dim, sizes.tags, preset.head_dropout)

    def mix_targets(self, sub, partner, lam):
        return {"tags": lam * sub["tags"] + (1 - lam) * sub["tags"][partner]}  # (B, T)

    def loss_state(self, cfg, vocabs):
        """(T,) neg/pos per tag from the training split when tasks.tagging.pos_weight, else None; a tag
        without training positives gets 1."""
        if not cfg.tasks.tagging.pos_weight:
            return None
        share, _ = tag_frequencies(cfg, vocabs.tags)
        weight = np.where(share > 0, (1 - share) / np.maximum(share, 1e-12), 1.0)
        return torch.tensor(weight, dtype=torch.float32)

    def loss(self, out, sub, cfg, state):
        logits = out["logits"].float()  # (B, T)
        pos_weight = state.to(logits.device) if state is not None else None
        return F.binary_cross_entropy_with_logits(logits, sub["tags"].float(), pos_weight=pos_weight)

    def predict(self, model, sub, images, cfg, vocabs):
        probs = tta_probabilities(lambda x: tag_probabilities(model, x), images, cfg.eval.tta)  # (B, T)
        return [{"image_id": i, "tags": t.nonzero().flatten().tolist(), "scores": p.tolist()}
                for i, t, p in zip(sub["image_id"], sub["tags"], probs.cpu())]

    def _truth(self, rows: list[dict], num_tags: int) -> np.ndarray:
        truth = np.zeros((len(rows), num_tags), dtype=bool)
        for i, r in enumerate(rows):
            truth[i, r["tags"]] = True
        return truth

    def score(self, rows, cfg, vocabs):
        scores = np.array([r["scores"] for r in rows], dtype=np.float64).reshape(len(rows), len(vocabs.tags))
        return score_tagging(scores, self._truth(rows, len(vocabs.tags)), vocabs.tags)

    def baselines(self, rows, cfg, vocabs):
        """"frequency": every image scored with the training split's tag frequencies."""
        try:
            share, images = tag_frequencies(cfg, vocabs.tags)
        except UserError as e:  # no training split in an evaluation-only store
            log.warning("no tagging baseline from the training split: %s", e)
            return {}
        scores = np.tile(share, (len(rows), 1))
        return {"frequency": {**score_tagging(scores, self._truth(rows, len(vocabs.tags)), vocabs.tags),
                              "name": f"training tag frequencies ({images} images)"}}

    def prediction_files(self, rows, vocabs):
        return {"tagging.json": [
            {"image_id": r["image_id"], "tags": [vocabs.tags[i] for i in r["tags"]],
             "predicted": [t for t, p in zip(vocabs.tags, r["scores"]) if p >= THRESHOLD],
             "scores": dict(zip(vocabs.tags, r["scores"]))}
            for r in rows]}

    def sample_fields(self, rows, vocabs):
        r = rows[0]
        return {"tags": [vocabs.tags[i] for i in r["tags"]],
                "predicted_tags": [t for t, p in zip(vocabs.tags, r["scores"]) if p >= THRESHOLD]}

    def report_section(self, scores, out_dir):
        return [format_tagging_table(scores), ""]

    def infer(self, model, images, questions, question_texts, cfg, vocabs, class_probabilities):
        probs = tta_probabilities(lambda x: tag_probabilities(model, x), images, cfg.eval.tta)  # (B, T)
        return [{"tags": [t for t, p in zip(vocabs.tags, ps) if p > THRESHOLD], "tag_scores": dict(zip(vocabs.tags, ps))}
                for ps in probs.tolist()]

    def infer_fields(self):
        import pyarrow as pa

        return [("tags", pa.list_(pa.string())), ("tag_scores", pa.map_(pa.string(), pa.float64()))]


TASK = Tagging()
