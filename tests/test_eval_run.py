"""`spatialnet eval run` and `spatialnet predict` on an inference bundle of a tiny model over the
synthetic corpus: every sample of the split is predicted once, scored, and written with a report."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist import config as config_mod
from spatialnet_dist.cli import main
from spatialnet_dist.corpora.synthetic import write_synthetic
from spatialnet_dist.data.vocab import build_vocabs
from spatialnet_dist.metrics.vqa import load_vqa_predictions, score_vqa
from spatialnet_dist.model.spatialnet import build_model
from spatialnet_dist.store.manifest import read_manifest


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def write_bundle(directory: Path, cfg, vocabs) -> str:
    """An untrained model saved as `export_bundle` lays out a trained one."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.tasks.enabled(), vocabs)
    directory.mkdir(parents=True)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(directory / ckpt.BUNDLE_WEIGHTS))
    (directory / ckpt.CONFIG).write_text(cfg.to_yaml())
    vocabs.save(directory)
    return str(directory)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(str(root), images=30, seed=0, shard_size=4)
    return str(root)


def bundle_for(store: str, directory: Path, captioning: bool) -> str:
    cfg = config_mod.load(
        None,
        [
            f"data.root={store}",
            "data.loader_workers=0",
            "model.image_size=32",
            "eval.beam_size=2",
            f"tasks.captioning.enabled={str(captioning).lower()}",
        ],
    )
    return write_bundle(directory, cfg, build_vocabs(cfg))


@pytest.fixture(scope="module")
def bundle(store, tmp_path_factory):
    return bundle_for(store, tmp_path_factory.mktemp("bundle") / "model", captioning=False)


def assert_report_links_resolve(report: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", report.read_text()):
        assert (report.parent / unquote(target)).is_file(), target


def test_eval_run_scores_every_sample_of_the_split(store, bundle, tmp_path):
    out = tmp_path / "eval"
    rc, stdout, stderr = run_cli(["eval", "run", bundle, "--data", store, "--split", "test", "--out", str(out)])
    assert rc == 0, stderr
    metrics = json.loads(stdout)
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"vqa", "classification", "regression"}

    test = read_manifest(store, "synthetic")["splits"]["test"]
    assert metrics["vqa"]["n"] == test["questions"]
    assert metrics["classification"]["n"] == test["samples"]
    assert 0 <= metrics["vqa"]["OA"] <= 1 and len(metrics["classification"]["confusion"]) == 8

    # The written predictions are the `spatialnet eval vqa` input and give the same scores.
    rows = load_vqa_predictions(out / "predictions" / "vqa.json")
    assert score_vqa(rows) == {k: v for k, v in metrics["vqa"].items() if k != "baselines"}
    assert set(metrics["vqa"]["baselines"]) == {"majority", "question_only"}
    assert set(metrics["classification"]["baselines"]) == {"majority"}
    assert set(metrics["regression"]["baselines"]) == {"median"}
    for scores, key in ((metrics["vqa"], "OA"), (metrics["vqa"], "AA"), (metrics["classification"], "accuracy")):
        lo, hi = scores[f"{key}_ci"]
        assert lo <= scores[key] <= hi

    report = out / "report.md"
    assert_report_links_resolve(report)
    for png in ("confusion.png", "samples.png"):
        with Image.open(out / png) as im:
            im.verify()
    assert "most frequent training answer per type" in report.read_text()


def test_eval_run_refuses_a_missing_checkpoint_in_one_line(store, tmp_path):
    rc, _, stderr = run_cli(["eval", "run", str(tmp_path / "nothing"), "--data", store])
    assert rc == 2 and stderr.count("\n") == 1 and "nothing" in stderr


def test_predict_images_of_any_size_and_format(bundle, tmp_path):
    png, npy = tmp_path / "scene.png", tmp_path / "bands.npy"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(png)
    np.save(npy, np.random.default_rng(1).normal(size=(20, 20, 5)).astype(np.float32))
    rc, stdout, stderr = run_cli(
        [
            "predict",
            bundle,
            str(png),
            str(npy),
            "--question",
            "How many buildings are there?",
            "--question",
            "Is there a road?",
            "--json",
        ]
    )
    assert rc == 0, stderr
    results = json.loads(stdout)
    classes = json.loads((Path(bundle) / "vocab.json").read_text())["classes"]
    assert [r["image"] for r in results] == [str(png), str(npy)]
    for r in results:
        assert r["class"] in classes and 0 < r["probability"] <= 1
        assert [a["question"] for a in r["answers"]] == ["How many buildings are there?", "Is there a road?"]
        assert "caption" not in r  # this model has no captioning head

    rc, stdout, _ = run_cli(["predict", bundle, str(png)])
    assert rc == 0 and "land use:" in stdout

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    rc, _, stderr = run_cli(["predict", bundle, str(bad)])
    assert rc == 2 and stderr.count("\n") == 1 and "broken.png: unreadable image" in stderr


@pytest.mark.slow  # starts Ray, and scores captions with java (METEOR)
def test_eval_run_over_ray_workers_matches_one_process(store, shared_ray, tmp_path):
    bundle = bundle_for(store, tmp_path / "model", captioning=True)
    rc, stdout, stderr = run_cli(
        ["eval", "run", bundle, "--data", store, "--out", str(tmp_path / "ray"), "--workers", "2"]
    )
    assert rc == 0, stderr
    over_ray = json.loads(stdout)
    assert set(over_ray["captioning"]) == {
        "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CIDEr_ci", "baselines"
    }
    assert set(over_ray["captioning"]["baselines"]) == {"fixed_caption", "class_oracle"}
    caption_rows = json.loads((tmp_path / "ray" / "predictions" / "captions.json").read_text())
    assert len(caption_rows) == read_manifest(store, "synthetic")["splits"]["test"]["samples"]

    from spatialnet_dist.checkpoint_weights import load_model
    from spatialnet_dist.evaluate.run import predict_split, score_predictions

    model, cfg, vocabs = load_model(bundle)
    one_process = predict_split(model, cfg, vocabs, "test").rows
    one_process.pop("captioning")  # scored above; java once is enough
    without_baselines = {task: {k: v for k, v in s.items() if k != "baselines"} for task, s in over_ray.items()}
    without_baselines.pop("captioning")
    # Float scores within rounding: each worker predicts its own batches, and a matmul over another batch shape may
    # round a regression output differently in its 8th digit (seen in CI). Any prediction that changed class would
    # move an accuracy by 1/n, far outside the tolerance.
    ours, theirs = leaves(score_predictions(one_process, cfg, vocabs)), leaves(without_baselines)
    assert ours.keys() == theirs.keys()
    floats = {path for path, value in theirs.items() if isinstance(value, float)}
    assert {p: v for p, v in ours.items() if p not in floats} == {p: v for p, v in theirs.items() if p not in floats}
    assert {p: ours[p] for p in floats} == pytest.approx({p: theirs[p] for p in floats}, rel=1e-6)


def leaves(scores, path: str = "") -> dict[str, float]:
    """Nested scores -> {"/vqa/per_type/count": 0.5, ...}, the form pytest.approx compares."""
    if isinstance(scores, dict):
        return {k: v for key, value in scores.items() for k, v in leaves(value, f"{path}/{key}").items()}
    if isinstance(scores, list):
        return {k: v for i, value in enumerate(scores) for k, v in leaves(value, f"{path}/{i}").items()}
    return {path: scores}


def test_an_exported_bundle_is_checked_and_one_from_elsewhere_loads(bundle, tmp_path):
    """`bundle` stands for one from elsewhere: the three files, no manifest. Exporting it again writes
    a manifest; `predict` then checks the weights against it and refuses them altered."""
    png = tmp_path / "scene.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(png)
    exported = tmp_path / "exported"
    rc, _, stderr = run_cli(["export", bundle, str(exported)])
    assert rc == 0, stderr
    listed = json.loads((exported / ckpt.MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(ckpt.BUNDLE_FILES)
    for source in (bundle, str(exported)):
        rc, stdout, stderr = run_cli(["predict", source, str(png), "--json"])
        assert rc == 0, stderr
        assert json.loads(stdout)[0]["class"]
    weights = exported / ckpt.BUNDLE_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    rc, _, stderr = run_cli(["predict", str(exported), str(png)])
    assert rc == 2 and stderr.count("\n") == 1 and f"{ckpt.BUNDLE_WEIGHTS} does not match the sha256" in stderr
