"""spatialnet_dist.jobs: what it hands train/ from evaluate/ (the validation, the end-of-run evaluation), and
eval.keep_best through the Ray job (the best checkpoint kept, evaluated and named by RESULT)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from spatialnet_dist import checkpoint as ckpt
from spatialnet_dist import config as config_mod
from spatialnet_dist import jobs
from spatialnet_dist.evaluate.run import ValidationPass
from spatialnet_dist.train import launch
from spatialnet_dist.train.rundir import RunDir


def test_end_of_run_evaluation_writes_into_the_run_and_gives_rays_headline(monkeypatch, tmp_path):
    called = {}

    def evaluate_model(model, cfg, vocabs, split, rank, world_size, out_dir, metrics_jsonl, tracker):
        called.update(split=split, out_dir=out_dir, metrics_jsonl=metrics_jsonl, tracker=tracker)
        return {"captioning": {"CIDEr": 0.5, "BLEU-4": 0.2, "METEOR": 0.1}, "vqa": {"OA": 0.7},
                "regression": {"MAE": 1.5}}

    monkeypatch.setattr(jobs, "evaluate_model", evaluate_model)
    run = RunDir(str(tmp_path / "run"))
    cfg = config_mod.load(None, ["eval.split=val"])
    headline = jobs.evaluate_at_end(None, cfg, None, 0, 1, run, "rank 0's tracker")
    assert headline == {"test/captioning_CIDEr": 0.5, "test/captioning_BLEU-4": 0.2, "test/vqa_OA": 0.7}
    assert called == {"split": "val", "out_dir": run.path("eval"), "metrics_jsonl": run.path("metrics.jsonl"),
                      "tracker": "rank 0's tracker"}


def test_the_ray_worker_is_handed_the_validation_and_evaluation(monkeypatch):
    handed = []
    # A stand-in for train/worker.py, whose import (Ray Train, DeepSpeed) the fast suite does without.
    stand_in = types.ModuleType("spatialnet_dist.train.worker")
    stand_in.train_loop_per_worker = lambda *args: handed.append(args)
    monkeypatch.setitem(sys.modules, "spatialnet_dist.train.worker", stand_in)
    jobs.ray_train_loop({"config": {}})
    assert handed == [({"config": {}}, ValidationPass, jobs.evaluate_at_end)]


def _predicted_tags(eval_dir) -> dict[str, list[float]]:
    rows = json.loads((eval_dir / "predictions" / "tagging.json").read_text())
    return {r["image_id"]: list(r["scores"].values()) for r in rows}


@pytest.mark.slow  # a Ray job of 2 workers: 6 steps, 3 validations, the end-of-run evaluation
def test_keep_best_keeps_and_evaluates_the_best_checkpoint_and_result_names_it(shared_ray, tmp_path, capsys,
                                                                              monkeypatch):
    """eval.keep_best through the Ray job. A high lr makes the model worse after its first steps, so the best of
    the validations at 2, 4 and 6 is not the last; run.keep_checkpoints=1 keeps it all the same, and the
    end-of-run evaluation predicts with its weights: those `eval run` predicts with from it, not the last's.
    Ray's shutdown of the finished group is no pre-emption; the same job again finds the run complete."""
    from test_train import TINY, result_line, sets

    from spatialnet_dist.corpora.synthetic import write_synthetic
    from spatialnet_dist.evaluate.run import evaluate_checkpoint

    root, runs = str(tmp_path / "shards"), str(tmp_path / "runs")
    write_synthetic(root, images=40, seed=0, shard_size=10)
    off = [f"tasks.{t}.enabled=false" for t in ("captioning", "vqa", "regression")]
    args = sets(*TINY, *off, f"data.root={root}", f"run.storage={runs}", "run.name=best", "tasks.tagging.enabled=true",
                "optim.lr=3e-2", "optim.warmup_steps=0", "train.max_steps=6", "train.checkpoint_every=2",
                "run.keep_checkpoints=1", "eval.every=2", "eval.val_batches=2", "eval.at_end=true",
                "eval.keep_best=tagging_mAP_macro")
    code = jobs.train_with_ray(args)
    captured = capsys.readouterr()
    result = result_line(captured.out)
    assert code == 0, result
    assert "(RayTrainWorker" in captured.err and "SIGTERM" not in captured.err  # the workers' logs, no pre-emption

    monkeypatch.setattr(launch, "run_training", lambda *args: pytest.fail("a second job trained"))
    assert jobs.train_with_ray(args) == 0
    said, again = capsys.readouterr().out.strip().splitlines()[-2:]
    assert said.startswith(f"{runs}/best: this run is complete at step 6") and result_line(again) == result
    run = RunDir(f"{runs}/best")
    validated = {m["step"]: m["val/tagging_mAP_macro"] for m in run.metrics() if "val/tagging_mAP_macro" in m}
    assert list(validated) == [2, 4, 6]
    best = max(validated, key=lambda step: (validated[step], -step))  # higher is better; a tie: the earlier
    assert best != 6 and validated[best] > validated[6], validated
    assert result["best_step"] == best and result["checkpoint"] == run.path(ckpt.checkpoint_name(best))
    assert json.loads((tmp_path / "runs" / "best" / "best.json").read_text()) == {
        "step": best, "metric": "tagging_mAP_macro", "value": validated[best]}
    last = run.path(ckpt.checkpoint_name(6))
    assert [url for url, complete in ckpt.checkpoints(run.url)] == [result["checkpoint"], last]
    assert run.describe()["best_step"] == best

    evaluated = _predicted_tags(tmp_path / "runs" / "best" / "eval")
    for url, out in ((result["checkpoint"], tmp_path / "of-best"), (last, tmp_path / "of-last")):
        evaluate_checkpoint(url, root, "test", out=str(out))
    assert evaluated.keys() == _predicted_tags(tmp_path / "of-best").keys() and len(evaluated) > 0
    for image_id, scores in _predicted_tags(tmp_path / "of-best").items():
        assert evaluated[image_id] == pytest.approx(scores, rel=1e-4, abs=1e-6), image_id
    assert any(evaluated[i] != pytest.approx(s, rel=1e-3) for i, s in _predicted_tags(tmp_path / "of-last").items())
