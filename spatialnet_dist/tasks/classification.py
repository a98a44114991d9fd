"""classification: the image's land-use class (one of the classification corpora's classes). Softmax
cross-entropy with optional label smoothing, and with mixup/cutmix (data/mixing.py) a mixed row's CE
against both labels weighted by their images' shares; accuracy, per-class scores and the confusion matrix."""

from __future__ import annotations

from typing import NotRequired, TypedDict

import torch
from torch import nn

from spatialnet_dist.batch_format import own_rows
from spatialnet_dist.metrics.baselines import most_frequent, training_text
from spatialnet_dist.metrics.classification import format_classification_table, plot_confusion, score_classification
from spatialnet_dist.tasks.base import MIX_OPTIONS, Task, cross_entropy, tta_probabilities

CONFUSION_PNG = "confusion.png"
TOP_K = 5  # classes in an inference's class_topk


class ClassificationBatch(TypedDict):
    image: torch.Tensor  # (B, C, S, S) float32
    image_id: list[str]  # [B]
    label: torch.Tensor  # (B,) int64, -1 for a class outside the vocabulary
    # Only in a mixed training micro-batch (data/mixing.py), whose row i shows mix_lambda[i] of its own image
    # (label) and the rest of its partner's (label_mix):
    label_mix: NotRequired[torch.Tensor]  # (B,) int64, the partner's label, -1 as label
    mix_lambda: NotRequired[torch.Tensor]  # (B,) float32 in [0, 1], the same for every row of the micro-batch


class ClassificationHead(nn.Module):
    """Linear over the pooled vector; softmax is implied by the cross-entropy loss."""

    def __init__(self, encoder_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(encoder_dim, num_classes)

    def forward(self, tokens, pooled, sub_batch) -> dict:
        return {"logits": self.fc(self.drop(own_rows(pooled, sub_batch)))}  # (B, K)


def class_logits(model, images: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) -> (B, K) land-use class logits."""
    return model({"classification": {"image": images}})["classification"]["logits"]


class Classification(Task):
    name = "classification"
    needs = "classes"
    label_vocab = "classes"
    augment = "strong"
    strong_augment = True
    validation_keys = ("accuracy",)
    headline_keys = ("accuracy",)
    report_heading = "Land-use classification"
    options = MIX_OPTIONS
    default_inference_place = 1
    maps_classes = True

    def has_content(self, manifest, split):
        return bool(manifest.get("classes"))

    def epoch_rows(self, manifest, split):
        # the labelled images: a corpus with classes labels every image, as every convert adapter writes it
        return split["samples"] if manifest.get("classes") else 0

    def row(self, s, rows, rng, symmetry):
        return None if s.label_name is None else {"label": rows.class_index.get(s.label_name, -1)}

    def head(self, encoder_dim, preset, sizes, model_cfg, task_cfg):
        return ClassificationHead(encoder_dim, sizes.classes, preset.head_dropout)

    def mix_targets(self, sub, partner, lam):
        return {"label_mix": sub["label"][partner], "mix_lambda": torch.full((len(partner),), lam, dtype=torch.float32)}

    def loss(self, out, sub, cfg, state):
        if "mix_lambda" not in sub:
            return cross_entropy(out["logits"], sub["label"], ignore=-1, label_smoothing=cfg.label_smoothing)
        lam = sub["mix_lambda"]  # (B,); label_mix is a permutation of label: both terms average over as many rows
        return (cross_entropy(out["logits"], sub["label"], -1, cfg.label_smoothing, lam)
                + cross_entropy(out["logits"], sub["label_mix"], -1, cfg.label_smoothing, 1 - lam))

    def predict(self, model, sub, images, cfg, vocabs):
        probs = tta_probabilities(lambda x: class_logits(model, x).float().softmax(-1), images, cfg.eval.tta)  # (B, K)
        best_p, best = probs.max(-1)
        return [
            {"image_id": i, "label": int(t), "prediction": int(b), "probability": float(p)}
            for i, t, b, p in zip(sub["image_id"], sub["label"], best, best_p)
        ]

    def score(self, rows, cfg, vocabs):
        labelled = [r for r in rows if r["label"] >= 0]
        if not labelled:
            return None
        return score_classification([r["prediction"] for r in labelled], [r["label"] for r in labelled], vocabs.classes)

    def baselines(self, rows, cfg, vocabs):
        """"majority": the training split's most frequent class for every image."""
        labels = [r["label"] for r in rows if r["label"] >= 0]
        counts = training_text(cfg, vocabs, classes=[self.name]).classes
        if not labels or not counts:
            return {}
        majority = most_frequent(counts)
        share = labels.count(vocabs.classes.index(majority)) / len(labels)
        return {"majority": {"accuracy": share, "n": len(labels),
                             "name": f"most frequent training class: {majority}"}}

    def prediction_files(self, rows, vocabs):
        def name(i: int) -> str | None:
            return vocabs.classes[i] if i >= 0 else None

        return {"classification.json": [{**r, "label": name(r["label"]), "prediction": name(r["prediction"])}
                                        for r in rows]}

    def sample_fields(self, rows, vocabs):
        c = rows[0]
        return {"label": vocabs.classes[c["label"]] if c["label"] >= 0 else None,
                "predicted_label": vocabs.classes[c["prediction"]]}

    def report_section(self, scores, out_dir):

        plot_confusion(scores["confusion"], list(scores["per_class"]), out_dir / CONFUSION_PNG)
        return [format_classification_table(scores), "",
                f"![Confusion matrix: true class by predicted class]({CONFUSION_PNG})", ""]

    def infer(self, model, images, questions, question_texts, cfg, vocabs, class_probabilities):
        probs = tta_probabilities(lambda x: class_logits(model, x).float().softmax(-1), images, cfg.eval.tta)  # (B, K)
        top_p, top = probs.topk(min(TOP_K, probs.shape[1]), -1)  # (B, k), (B, k)
        out = [{"class": vocabs.classes[ks[0]], "probability": ps[0],
                "class_topk": [{"class": vocabs.classes[k], "probability": p} for k, p in zip(ks, ps)]}
               for ps, ks in zip(top_p.tolist(), top.tolist())]
        if class_probabilities:
            for r, ps in zip(out, probs.tolist()):
                r["class_probabilities"] = ps
        return out

    def infer_fields(self):
        import pyarrow as pa

        topk = pa.list_(pa.struct([("class", pa.string()), ("probability", pa.float64())]))
        return [("class", pa.string()), ("probability", pa.float64()), ("class_topk", topk)]


TASK = Classification()
