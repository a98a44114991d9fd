"""The run report: `report.md` beside PNG figures, what a person opens after a run.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot: no global state, nothing
left open), saved next to `report.md` and referenced relatively, so the folder reads the same in any
Markdown viewer, on a laptop or after a copy from object storage.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from urllib.parse import quote

import numpy as np

from spatialnet_dist import tasks as registry
from spatialnet_dist.display import displayable, sample_markdown

REPORT_NAME = "report.md"
LOSSES_PNG, SAMPLES_PNG = "losses.png", "samples.png"


# ---- loss curves ----


def read_loss_curves(metrics_jsonl: str | Path) -> tuple[dict[str, dict[str, tuple[list, list]]], int]:
    """metrics.jsonl -> ({task: {"train"|"val": (steps, values)}}, lines skipped).

    Keys read: "loss" and "val/loss" (task "total"), "<task>_loss" and "val/<task>_loss"; lines without
    a step, unreadable lines (a run killed mid-write) and non-finite values are skipped, other keys ignored.
    """
    curves: dict[str, dict[str, tuple[list, list]]] = {}
    skipped = 0
    for line in Path(metrics_jsonl).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = float(record["step"])
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        for key, value in record.items():
            split, name = ("val", key[4:]) if key.startswith("val/") else ("train", key)
            if name != "loss" and not name.endswith("_loss"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            task = "total" if name == "loss" else name[: -len("_loss")]
            steps, values = curves.setdefault(task, {}).setdefault(split, ([], []))
            steps.append(step)
            values.append(float(value))
    return curves, skipped


def plot_loss_curves(curves: dict, path: Path) -> None:
    """One panel per task (the weighted total first): training loss as a line, validation loss as dots."""
    from matplotlib.figure import Figure

    tasks = sorted(curves, key=lambda t: (t != "total", t))
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(rows, cols, i + 1)
        if "train" in curves[task]:
            steps, values = curves[task]["train"]
            ax.plot(steps, values, "-" if len(steps) > 1 else "o", label="train", linewidth=1.2, markersize=4)
        if "val" in curves[task]:
            ax.plot(*curves[task]["val"], "o-", label="validation", markersize=4)
        ax.set_title("weighted total" if task == "total" else task)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


# ---- confusion matrix ----


# ---- sample images ----


def plot_samples(samples: list[dict], path: Path) -> None:
    """A grid of the sample images, each titled with its id and the generated caption under it; a sample with a
    mae reconstruction shows that instead (the image, its visible patches and the reconstruction side by side)."""
    from matplotlib.figure import Figure

    cols = min(4, len(samples))
    rows = math.ceil(len(samples) / cols)
    fig = Figure(figsize=(3.4 * cols, 4.0 * rows), layout="constrained")
    for i, sample in enumerate(samples):
        ax = fig.add_subplot(rows, cols, i + 1)
        shown = sample.get("reconstruction")
        image = displayable(sample["image"] if shown is None else shown)
        # fixed ranges: a grey image is drawn as grey levels, not stretched by imshow's autoscale
        ax.imshow(image, cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(sample["image_id"]), fontsize="small")
        if sample.get("caption") is not None:
            ax.set_xlabel(textwrap.fill(sample["caption"], 34), fontsize="small")
    fig.savefig(path, dpi=110)


# ---- the report ----


def _link(target: str | Path, out_dir: Path) -> str:
    """A relative, URL-quoted link from report.md to a file (given absolute or relative to out_dir)."""
    target = Path(target)
    relative = os.path.relpath(target if target.is_absolute() else out_dir / target, out_dir)
    return quote(Path(relative).as_posix())


def write_report(
    out_dir: str | Path,
    metrics: dict,
    metrics_jsonl: str | Path | None = None,
    predictions: dict[str, str | Path] | None = None,
    samples: list[dict] | None = None,
    title: str = "Evaluation report",
) -> Path:
    """Write `<out_dir>/report.md` and its PNG figures (a local folder); -> the report's path.

    metrics: {task: scores} for the tasks evaluated, each as its task's `score` returns it (a section per
        task, in registry order, drawn by the task's `report_section`: e.g. "captioning": score_captions(...),
        "vqa": score_vqa(...), "classification": score_classification(...) with a confusion matrix);
        each may hold "baselines": {key: scores of the same shape with a "name"} (the task's `baselines`),
        shown as rows under this run's in its table, and 95% intervals ("OA_ci", ...) shown in brackets.
    metrics_jsonl: the run's local metrics.jsonl or None; lines {"step", "loss", "<task>_loss",
        "val/<task>_loss", ...}, any of them may be missing (see read_loss_curves).
    predictions: {task: path of its prediction file}, absolute or relative to out_dir; linked, not read.
    samples: a few test images, each {"image": (H, W, C) array (uint8, or any dtype: stretched) or an
        image/NPY path, "image_id": str, and optionally "caption": generated str, "references": [str],
        "label": true class name, "predicted_label": str, "qa": [{"question", "answer", "prediction"}],
        "reconstruction_MSE": float and "reconstruction": (H, 3W, C) array (mae's: image, masked, reconstructed)}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]

    md += ["## Test metrics", ""]
    evaluated = [t for t in registry.all_tasks() if metrics.get(t.name)]
    for task in evaluated:
        md += [f"### {task.report_heading or task.name}", "", *task.report_section(metrics[task.name], out_dir)]
    if not evaluated:
        md += ["No task was evaluated.", ""]

    md += ["## Training", ""]
    if metrics_jsonl is None:
        md += ["No metrics.jsonl was given.", ""]
    elif not Path(metrics_jsonl).is_file():
        md += [f"No metrics.jsonl at `{metrics_jsonl}`.", ""]
    else:
        curves, skipped = read_loss_curves(metrics_jsonl)
        if curves:
            plot_loss_curves(curves, out_dir / LOSSES_PNG)
            md += [f"![Training and validation loss per task]({LOSSES_PNG})", ""]
        else:
            md += ["metrics.jsonl holds no loss values.", ""]
        if skipped:
            md += [f"{skipped} line(s) of metrics.jsonl skipped: unreadable or without a step.", ""]

    if samples:
        plot_samples(samples, out_dir / SAMPLES_PNG)
        md += ["## Sample test images", "", f"![Sample test images with generated captions]({SAMPLES_PNG})", ""]
        for sample in samples:
            md += sample_markdown(sample)

    if predictions:
        md += [
            "## Predictions",
            "",
            *(f"- {task}: [{Path(p).name}]({_link(p, out_dir)})" for task, p in predictions.items()),
            "",
        ]

    path = out_dir / REPORT_NAME
    path.write_text("\n".join(md), encoding="utf-8")
    return path
