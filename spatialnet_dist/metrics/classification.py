"""Land-use classification: accuracy, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spatialnet_dist.display import markdown_table
from spatialnet_dist.metrics import bootstrap_interval, percent, run_and_baselines, with_interval


def score_classification(pred: list[int], true: list[int], classes: list[str]) -> dict:
    """-> {"accuracy", "accuracy_ci": its 95% bootstrap interval [lo, hi] over the images, "n",
    "per_class": {class name: accuracy or None}, "confusion": [[count]]}.

    pred, true: class indices into `classes` (callers drop unlabelled samples, label -1, first).
    per_class[c] is the fraction of class-c images predicted as c (None when the split has none);
    `confusion[i][j]` counts images of true class i predicted as class j.
    """
    if len(pred) != len(true) or not true:
        raise ValueError(
            f"score_classification needs as many predictions as labels, at least one (got {len(pred)} and {len(true)})"
        )
    k = len(classes)
    outside = [int(i) for i in (*pred, *true) if not 0 <= int(i) < k]
    if outside:
        raise ValueError(f"class indices {sorted(set(outside))[:5]} outside 0..{k - 1} ({k} classes)")
    confusion = [[0] * k for _ in range(k)]
    for p, t in zip(pred, true):
        confusion[int(t)][int(p)] += 1
    per_class = {
        name: (confusion[i][i] / sum(confusion[i]) if sum(confusion[i]) else None) for i, name in enumerate(classes)
    }
    correct = np.array(pred) == np.array(true)  # (n,)
    return {
        "accuracy": sum(confusion[i][i] for i in range(k)) / len(true),
        "accuracy_ci": bootstrap_interval(lambda idx: correct[idx].mean(1), len(true)),
        "n": len(true),
        "per_class": per_class,
        "confusion": confusion,
    }


def format_classification_table(scores: dict) -> str:
    """Overall accuracy with its 95% interval (each of scores["baselines"] a row under it) and the
    per-class accuracies, in percent."""
    rows = [[name, with_interval(s.get("accuracy"), s.get("accuracy_ci"))] for name, s in run_and_baselines(scores)]
    overall = markdown_table(["classification", "accuracy"], rows)
    per_class = markdown_table(
        ["class", "accuracy"], [[name, percent(acc)] for name, acc in scores["per_class"].items()]
    )
    interval = "; [lo, hi]: 95% bootstrap interval over the images" if "accuracy_ci" in scores else ""
    return f"{overall}\n\n{per_class}\n\nAccuracy in percent over {scores['n']} images{interval}."


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    """Rows: true class, columns: predicted; colour = row-normalised rate, numbers = counts (up to 25 classes)."""
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=float)  # (K, K)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    side = max(4.0, 0.4 * k + 2.5)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.add_subplot()
    shown = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, label="fraction of the true class", shrink=0.8)
    ax.set_xticks(range(k), classes, rotation=90, fontsize="small")
    ax.set_yticks(range(k), classes, fontsize="small")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        int(counts[i, j]),
                        ha="center",
                        va="center",
                        fontsize="x-small",
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    fig.savefig(path, dpi=110)
