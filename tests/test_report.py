"""The run report renders: report.md and its figures exist, the PNGs open, every link resolves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from spatialnet_dist.evaluate.report import read_loss_curves, write_report
from spatialnet_dist.metrics.classification import score_classification
from spatialnet_dist.metrics.vqa import count_errors, score_vqa

CLASSES = ["beach", "farm", "port"]
CAPTIONS = {
    "BLEU-1": 0.61,
    "BLEU-2": 0.5,
    "BLEU-3": 0.41,
    "BLEU-4": 0.33,
    "METEOR": 0.28,
    "ROUGE-L": 0.55,
    "CIDEr": 1.42,
}


def links(markdown: str) -> list[str]:
    """Targets of every Markdown link and image: [text](target) and ![alt](target)."""
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


def assert_renders(report: Path) -> str:
    text = report.read_text()
    for target in links(text):
        assert not re.match(r"^[a-z]+://|^/", target), f"{target} is not relative"
        path = report.parent / unquote(target)
        assert path.is_file(), f"report.md links {target}, which does not exist"
        if path.suffix == ".png":
            with Image.open(path) as im:
                im.verify()
    return text


def write_metrics_jsonl(path: Path) -> None:
    lines = [
        json.dumps({"step": s, "loss": 3.0 / s, "captioning_loss": 2.0 / s, "vqa_loss": 1.0 / s, "lr": 1e-3})
        for s in range(1, 11)
    ]
    lines.append(json.dumps({"step": 5, "val/captioning_loss": 0.5, "val/vqa_loss": 0.3}))
    lines.append(json.dumps({"step": 10, "val/captioning_loss": 0.4, "classification_loss": 0.9}))
    lines.append(json.dumps({"loss": 1.0}))  # no step
    lines.append('{"step": 11, "loss": 0.2')  # the line a killed run leaves half-written
    path.write_text("\n".join(lines) + "\n")


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip("|").split("|")]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    out = tmp_path / "eval"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "captions.json").write_text("[]")
    metrics_jsonl = tmp_path / "metrics.jsonl"
    write_metrics_jsonl(metrics_jsonl)
    vqa_rows = [
        {"qid": "1", "type": "count", "answer": 4, "prediction": "between 0 and 10"},
        {"qid": "2", "type": "presence", "answer": "yes", "prediction": "no"},
        {"qid": "3", "type": "comp", "answer": "no", "prediction": "no"},
    ]
    third = {k: v / 3 for k, v in CAPTIONS.items()}
    majority = score_vqa([{**r, "prediction": "no"} for r in vqa_rows])
    metrics = {
        "captioning": {**CAPTIONS, "baselines": {"fixed_caption": {**third, "name": "most frequent caption"}}},
        "vqa": {**score_vqa(vqa_rows), "baselines": {"majority": {**majority, "name": "majority answer"}}},
        "classification": {
            **score_classification([0, 1, 2, 2], [0, 1, 1, 2], CLASSES),
            "baselines": {"majority": {"accuracy": 0.5, "n": 4}},
        },
        "regression": count_errors([3.5, 10], [4, 12]),
    }
    photo = tmp_path / "port_3.png"
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(photo)
    samples = [
        {
            "image": np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8),
            "image_id": "beach_00",
            "caption": "there is a long beach next to the sea",
            "references": ["A long beach is next to the blue sea.", "There is a beach | beside the sea."],
            "label": "beach",
            "predicted_label": "beach",
            "qa": [{"question": "How many boats are there?", "answer": 4, "prediction": "between 0 and 10"}],
        },
        {"image": photo, "image_id": "port_3", "caption": "many boats"},
        {"image": np.random.default_rng(1).normal(size=(16, 16, 5)).astype(np.float32), "image_id": "multiband_1"},
        {"image": np.zeros((8, 8), np.uint16), "image_id": "flat_gray"},
    ]
    report = write_report(
        out,
        metrics,
        metrics_jsonl,
        predictions={"captioning": "predictions/captions.json"},
        samples=samples,
        title="Evaluation of run demo, split test",
    )
    return report


def test_full_report_renders_with_every_link_resolving(full_report):
    text = assert_renders(full_report)
    assert full_report.name == "report.md"
    assert {"losses.png", "confusion.png", "samples.png", "predictions/captions.json"} <= set(links(text))
    assert text.startswith("# Evaluation of run demo, split test")


def test_full_report_tables_put_baselines_beside_the_run(full_report):
    text = full_report.read_text()
    lines = text.splitlines()
    captions = lines.index(next(line for line in lines if line.startswith("| captions")))
    assert cells(lines[captions + 2]) == ["this run", "61.00", "50.00", "41.00", "33.00", "28.00", "55.00", "142.00"]
    assert cells(lines[captions + 3])[:2] == ["most frequent caption", "20.33"]  # percent, CIDEr x100
    assert "majority answer" in text and "Count regression" in text
    assert "beside the sea" in text and "How many boats are there?" in text
    assert "2 line(s) of metrics.jsonl skipped" in text


def test_report_with_only_vqa_and_no_training_metrics(tmp_path):
    scores = score_vqa([{"qid": "1", "type": "presence", "answer": "yes", "prediction": "yes"}])
    report = write_report(tmp_path / "eval", {"vqa": scores}, None, {}, [])
    text = assert_renders(report)
    assert links(text) == []
    assert "No metrics.jsonl was given." in text and "100.00" in text
    report = write_report(tmp_path / "eval2", {"vqa": scores}, tmp_path / "missing.jsonl")
    assert "No metrics.jsonl at" in assert_renders(report)


def test_loss_curves_take_what_each_line_has(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics_jsonl(path)
    curves, skipped = read_loss_curves(path)
    assert skipped == 2
    assert set(curves) == {"total", "captioning", "vqa", "classification"}
    assert curves["captioning"]["val"] == ([5.0, 10.0], [0.5, 0.4])
    assert len(curves["total"]["train"][0]) == 10 and "val" not in curves["total"]
    assert curves["classification"] == {"train": ([10.0], [0.9])}
