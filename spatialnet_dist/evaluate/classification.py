"""Land-use classification: accuracy, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from spatialnet_dist.evaluate import markdown_table, percent


def score_classification(pred: list[int], true: list[int], classes: list[str]) -> dict:
    """-> {"accuracy", "n", "per_class": {class name: accuracy or None}, "confusion": [[count]]}.

    pred, true: class indices into `classes` (callers drop unlabelled samples, label -1, first).
    per_class[c] is the fraction of class-c images predicted as c (None when the split has none);
    confusion[i][j] counts images of true class i predicted as class j.
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
    return {
        "accuracy": sum(confusion[i][i] for i in range(k)) / len(true),
        "n": len(true),
        "per_class": per_class,
        "confusion": confusion,
    }


def format_classification_table(scores: dict, baseline: dict | None = None) -> str:
    """Overall accuracy (with the baseline's beside it when given) and the per-class accuracies, in percent."""
    rows = [["this run", percent(scores["accuracy"])]]
    if baseline is not None:
        rows.append([baseline.get("name", "trivial baseline"), percent(baseline.get("accuracy"))])
    overall = markdown_table(["classification", "accuracy"], rows)
    per_class = markdown_table(
        ["class", "accuracy"], [[name, percent(acc)] for name, acc in scores["per_class"].items()]
    )
    return f"{overall}\n\n{per_class}\n\nAccuracy in percent over {scores['n']} images."
