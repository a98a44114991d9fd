"""Metrics: captions against pycocoevalcap itself, VQA against hand-computed RSVQA-LR cases,
classification and count regression, bad input, and the `spatialnet eval captions|vqa` commands."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import socket
from types import SimpleNamespace

import pytest

from spatialnet_dist.cli import main
from spatialnet_dist.errors import UserError
from spatialnet_dist.metrics.captions import (
    CAPTION_METRICS,
    format_caption_table,
    load_caption_files,
    score_captions,
)
from spatialnet_dist.metrics.classification import score_classification
from spatialnet_dist.metrics.vqa import count_errors, format_vqa_table, load_vqa_predictions, score_vqa

PREDS = [
    {"image_id": "beach_00", "caption": "There is a long beach next to the sea."},
    {"image_id": "farm_07", "caption": "Many green farmlands, some bare!"},
    {"image_id": "port_3", "caption": "Lots of boats docked at the harbor"},
    {"image_id": "road_12", "caption": ""},  # a model may end at once; pycocoevalcap scores it 0
]
REFS = {
    "beach_00": [
        "A long beach is next to the blue sea.",
        "There is a beach beside the sea.",
        "The beach is long, and sandy.",
    ],
    "farm_07": ["Many pieces of farmland are green.", "Some farmlands are green and some are bare."],
    "port_3": ["Many boats are docked at the harbor.", "Lots of boats are in the port."],
    "road_12": ["A road goes through the trees."],
}


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


# ---- captions ----


@pytest.fixture(scope="module")
def caption_scores(tmp_path_factory):
    """One scoring through `spatialnet eval captions --json`, and pycocoevalcap's own COCOEvalCap on the
    same inputs (its SPICE stubbed out: SPICE downloads CoreNLP)."""
    import pycocoevalcap.eval as coco_eval

    d = tmp_path_factory.mktemp("captions")
    rc, out, err = run_cli(
        [
            "eval",
            "captions",
            "--pred",
            write_json(d / "pred.json", PREDS),
            "--refs",
            write_json(d / "refs.json", REFS),
            "--json",
        ]
    )

    coco = SimpleNamespace(
        getImgIds=lambda: [p["image_id"] for p in PREDS],
        imgToAnns={i: [{"image_id": i, "caption": c} for c in refs] for i, refs in REFS.items()},
    )
    coco_res = SimpleNamespace(imgToAnns={p["image_id"]: [p] for p in PREDS})

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(coco_eval, "Spice", NoSpice)
        evaluator = coco_eval.COCOEvalCap(coco, coco_res)
        evaluator.evaluate()
    names = dict(zip(CAPTION_METRICS, ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")))
    reference = {ours: evaluator.eval[theirs] for ours, theirs in names.items()}
    return rc, out, err, reference


@pytest.mark.slow  # two java METEOR + PTB tokenizer runs: ~25 s on an idle 2-core machine, minutes under load
def test_caption_scores_equal_pycocoevalcap(caption_scores):
    rc, out, err, reference = caption_scores
    assert rc == 0, err
    ours = json.loads(out)  # stdout is the JSON alone: no scorer chatter
    assert list(ours) == [*CAPTION_METRICS, "CIDEr_ci"]
    assert ours["CIDEr_ci"][0] <= ours["CIDEr"] <= ours["CIDEr_ci"][1]
    for name in CAPTION_METRICS:
        assert ours[name] == pytest.approx(reference[name], abs=1e-9), name
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1  # a real, partly matching case
    assert 0 < ours["METEOR"] < 1 and 0 < ours["ROUGE-L"] < 1 and ours["CIDEr"] > 0


@pytest.mark.slow  # METEOR's java process loads for ~13 s, here twice
def test_one_meteor_process_serves_every_scoring_until_one_fails(monkeypatch):
    from spatialnet_dist.metrics import captions

    first = score_captions(PREDS, REFS)
    meteor = captions._METEOR
    assert score_captions(PREDS, REFS) == first and captions._METEOR is meteor

    def broken(*args):
        raise RuntimeError("METEOR answered nonsense")

    monkeypatch.setattr(meteor, "_stat", broken)
    with pytest.raises(RuntimeError, match="nonsense"):
        score_captions(PREDS, REFS)
    assert meteor.meteor_p.poll() is not None and captions._METEOR is None  # ended, not left holding its lock
    assert score_captions(PREDS, REFS) == first  # a new process


def test_caption_table_is_paper_order_in_percent():
    scores = {
        "CIDEr": 2.5034,
        "ROUGE-L": 0.7,
        "METEOR": 0.4,
        "BLEU-4": 0.55,
        "BLEU-3": 0.6,
        "BLEU-2": 0.7,
        "BLEU-1": 0.8123,
    }
    table = format_caption_table(scores)
    header, _, row = table.splitlines()[:3]
    assert [c.strip() for c in header.strip("|").split("|")] == list(CAPTION_METRICS)
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "81.23",
        "70.00",
        "60.00",
        "55.00",
        "40.00",
        "70.00",
        "250.34",
    ]
    baseline = {**{k: 0.1 for k in scores}, "name": "most frequent caption"}
    with_baseline = format_caption_table({**scores, "CIDEr_ci": [2.4, 2.6], "baselines": {"fixed_caption": baseline}})
    assert "most frequent caption" in with_baseline and "this run" in with_baseline
    assert "250.34 [240.00, 260.00]" in with_baseline and "95% bootstrap interval" in with_baseline


def test_captions_without_java_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="apt-get install -y openjdk-17-jre-headless"):
        score_captions(PREDS, REFS)


def test_spice_offline_is_refused_without_a_download(monkeypatch):
    from pycocoevalcap.spice import get_stanford_models as models
    from pycocoevalcap.spice import spice

    if os.path.exists(os.path.join(models.SPICEDIR, models.SPICELIB, f"{models.JAR}.jar")):
        pytest.skip("CoreNLP for SPICE is already installed here")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    def no_download():
        raise AssertionError("tried to download CoreNLP")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(spice, "get_stanford_models", no_download)
    with pytest.raises(UserError, match="SPICE needs Stanford CoreNLP.*cannot be reached"):
        score_captions(PREDS, REFS, spice=True)


@pytest.mark.parametrize(
    "preds, refs, message",
    [
        (
            PREDS + [{"image_id": "lake_1", "caption": "a lake"}],
            REFS,
            r"pred.json: 1 prediction\(s\) have no references in .*refs.json: 'lake_1'",
        ),
        (
            PREDS[:2],
            REFS,
            r"refs.json: 2 image\(s\) have references but no prediction in .*pred.json: 'port_3', 'road_12'",
        ),
        ([], REFS, "pred.json: no predictions"),
        (PREDS + [PREDS[0]], REFS, r"pred.json: 1 image_id\(s\) predicted more than once: 'beach_00'"),
        ([{"image_id": "beach_00"}], REFS, "pred.json: row 0 lacks a string 'caption'"),
        (PREDS, list(REFS), "refs.json: expected an object"),
        (PREDS, {**REFS, "road_12": []}, "refs.json: image 'road_12' needs a non-empty list"),
    ],
)
def test_caption_files_bad_input_is_named(tmp_path, preds, refs, message):
    with pytest.raises(UserError, match=message):
        load_caption_files(write_json(tmp_path / "pred.json", preds), write_json(tmp_path / "refs.json", refs))


def test_many_missing_references_are_counted_not_all_listed(tmp_path):
    preds = PREDS + [{"image_id": f"extra_{i}", "caption": "x"} for i in range(10)]
    with pytest.raises(UserError, match=r"10 prediction\(s\) .*'extra_0', 'extra_1', 'extra_2' and 7 more$"):
        load_caption_files(write_json(tmp_path / "pred.json", preds), write_json(tmp_path / "refs.json", REFS))


def test_malformed_or_missing_json_names_the_file(tmp_path):
    bad = tmp_path / "pred.json"
    bad.write_text('[{"image_id": "a", "caption": "x"},')
    refs = write_json(tmp_path / "refs.json", REFS)
    with pytest.raises(UserError, match=r"pred.json: not valid JSON \(.* line 1 column"):
        load_caption_files(bad, refs)
    with pytest.raises(UserError, match="nope.json: no such file"):
        load_caption_files(tmp_path / "nope.json", refs)


# ---- VQA ----


def vqa_rows(cases, qtype="count"):
    return [{"qid": str(i), "type": qtype, "answer": a, "prediction": p} for i, (a, p) in enumerate(cases)]


def test_rsvqa_lr_bin_edges_upper_bounds_inclusive():
    right = [
        (0, "0"),
        (10, "between 0 and 10"),
        (11, "between 10 and 100"),
        (100, "between 10 and 100"),
        (101, "between 100 and 1000"),
        (1000, "between 100 and 1000"),
        (1001, "more than 1000"),
    ]
    wrong = [
        (0, "between 0 and 10"),
        (10, "between 10 and 100"),
        (100, "between 100 and 1000"),
        (1000, "more than 1000"),
    ]
    scores = score_vqa(vqa_rows(right + wrong), count_rule="rsvqa-lr")
    assert scores["per_type"] == {"count": 7 / 11}
    assert scores["OA"] == scores["AA"] == 7 / 11 and scores["n"] == 11


def test_rsvqa_lr_bins_numeric_predictions_too():
    cases = [(3, "7"), (3, 7), ("3", 10.0), (0, 0), (1001, "5000"), (55, "12"), (3, "12"), (0, "1"), (100, 101)]
    # right: same bin on both sides for the first six; 3 vs 12, 0 vs 1 and 100 vs 101 straddle an edge
    assert score_vqa(vqa_rows(cases))["OA"] == 6 / 9


def test_exact_rule_compares_normalised_answers():
    cases = [(3, "7"), ("12", "12.0"), (12, 12), (0, "between 0 and 10"), ("5", " 5 ")]
    assert score_vqa(vqa_rows(cases), count_rule="exact")["OA"] == 3 / 5
    presence = [("yes", "Yes"), ("no", " no "), ("yes", "no")]
    assert score_vqa(vqa_rows(presence, "presence"), count_rule="exact")["OA"] == 2 / 3


def test_aa_is_mean_of_types_oa_is_over_questions():
    rows = vqa_rows([("yes", "yes")] * 8, "presence") + [
        {"qid": f"c{i}", "type": "count", "answer": 4, "prediction": "0"} for i in range(2)
    ]
    scores = score_vqa(rows)
    assert scores["per_type"] == {"count": 0.0, "presence": 1.0}
    assert scores["OA"] == pytest.approx(0.8) and scores["AA"] == pytest.approx(0.5) and scores["n"] == 10


def test_unknown_question_type_is_reported_and_kept_apart(caplog):
    rows = vqa_rows([("yes", "yes"), ("no", "yes")], "presence") + [
        {"qid": "x1", "type": "colour", "answer": "red", "prediction": "red"}
    ]
    with caplog.at_level(logging.WARNING, logger="spatialnet_dist.metrics.vqa"):
        scores = score_vqa(rows)
    assert scores["per_type"] == {"presence": 0.5, "colour": 1.0}
    assert scores["AA"] == pytest.approx(0.75)
    assert "'colour'" in caplog.text and "not among the known" in caplog.text
    assert "colour*" in format_vqa_table(scores) and "not in the RSVQA schema (colour)" in format_vqa_table(scores)


def test_vqa_table_is_paper_order_in_percent():
    scores = {
        "per_type": {"rural_urban": 0.9, "comp": 0.8, "count": 0.675, "presence": 0.9},
        "AA": 0.81875,
        "OA": 0.8,
        "n": 40,
    }
    header, _, row = format_vqa_table(scores).splitlines()[:3]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Count",
        "Presence",
        "Comparison",
        "Rural/Urban",
        "AA",
        "OA",
    ]
    assert [c.strip() for c in row.strip("|").split("|")] == ["67.50", "90.00", "80.00", "90.00", "81.88", "80.00"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "pred.json: no predictions"),
        ({"qid": "1"}, "pred.json: expected a list"),
        (
            [{"qid": "1", "type": "count", "answer": 3, "prediction": 3}, {"qid": "2", "type": "count", "answer": 3}],
            "pred.json: row 1 lacks 'prediction'",
        ),
        (
            [{"qid": "1", "type": "presence", "answer": "yes", "prediction": "no"}] * 2,
            r"pred.json: 1 qid\(s\) appear more than once: '1'",
        ),
        ([{"qid": "1", "type": "presence", "answer": None, "prediction": "no"}], "pred.json: row 0 has answer None"),
    ],
)
def test_vqa_predictions_bad_input_is_named(tmp_path, rows, message):
    with pytest.raises(UserError, match=message):
        load_vqa_predictions(write_json(tmp_path / "pred.json", rows))


def test_unknown_count_rule_is_refused():
    with pytest.raises(UserError, match="count rule 'bins'"):
        score_vqa(vqa_rows([(1, 1)]), count_rule="bins")


def test_count_errors_on_raw_counts():
    scores = count_errors([1, 2.0, 3], [1, 4, 0])  # errors 0, -2, 3
    assert scores["MAE"] == pytest.approx(5 / 3)
    assert scores["RMSE"] == pytest.approx(math.sqrt(13 / 3))
    assert scores["n"] == 3
    with pytest.raises(ValueError):
        count_errors([1, 2], [1])


# ---- classification ----


def test_classification_accuracy_per_class_and_confusion():
    scores = score_classification([0, 1, 1, 2, 0], [0, 1, 2, 2, 2], ["beach", "farm", "port", "road"])
    assert scores["accuracy"] == pytest.approx(3 / 5) and scores["n"] == 5
    assert scores["per_class"] == {"beach": 1.0, "farm": 1.0, "port": pytest.approx(1 / 3), "road": None}
    # rows: true class, columns: predicted class
    assert scores["confusion"] == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="outside 0..3"):
        score_classification([0, 4], [0, -1], ["beach", "farm", "port", "road"])


# ---- the command line ----


def test_cli_eval_vqa_json_and_table(tmp_path):
    rows = vqa_rows([(3, "between 0 and 10"), (50, "0")]) + vqa_rows([("yes", "yes")], "presence")
    rows[-1]["qid"] = "p0"
    pred = write_json(tmp_path / "pred.json", rows)
    rc, out, _ = run_cli(["eval", "vqa", "--pred", pred, "--json"])
    assert rc == 0
    # Three questions: a resample may hold only wrong ones or only right ones, so the intervals span 0..1.
    assert json.loads(out) == {
        "per_type": {"count": 0.5, "presence": 1.0}, "AA": 0.75, "OA": 2 / 3, "n": 3,
        "AA_ci": [0.0, 1.0], "OA_ci": [0.0, 1.0],
    }
    rc, out, _ = run_cli(["eval", "vqa", "--pred", pred, "--count-rule", "exact"])
    assert rc == 0
    row = out.splitlines()[2]
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "0.00", "100.00", "50.00 [0.00, 100.00]", "33.33 [0.00, 100.00]"
    ]


@pytest.mark.parametrize("command", ["captions", "vqa"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, command):
    pred = tmp_path / "pred.json"
    pred.write_text("{not json")
    argv = ["eval", command, "--pred", str(pred)]
    if command == "captions":
        argv += ["--refs", write_json(tmp_path / "refs.json", REFS)]
    rc, out, err = run_cli(argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "pred.json: not valid JSON" in err
