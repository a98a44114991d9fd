"""spatialnet_dist.jobs: what it hands train/ from evaluate/ (the validation, the end-of-run evaluation)."""

from __future__ import annotations

import sys
import types

from spatialnet_dist import config as config_mod
from spatialnet_dist import jobs
from spatialnet_dist.evaluate.run import validation_metrics
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
    assert handed == [({"config": {}}, validation_metrics, jobs.evaluate_at_end)]
