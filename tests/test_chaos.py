"""The chaos test: a run under seeded faults of every kind ends with the parameters of an undisturbed run.

The storm is bench/chaos.py's (`python bench/chaos.py --faults 20 --json` for a longer one): two workers on two
`ray start` nodes on 127.0.0.1, ZeRO-2, shards and checkpoints on moto's S3 behind a proxy that goes down."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import chaos  # noqa: E402

RESTARTING = {"sigkill_worker", "node_loss", "damaged_checkpoint", "kill_during_upload"}  # a failed worker group


@pytest.mark.slow
def test_a_run_under_six_seeded_faults_ends_with_the_parameters_of_an_undisturbed_run(tmp_path, capsys):
    # Seed 276 draws about the shortest waits of the first 300 seeds (an outage of 7.5 s, the node down 2.2 s, S3
    # down 4 s around a kill; seed 0's: 29.7, 4.9 and 4.4 s), and 4 steps a fault are room for its 6 (a fault too
    # close to the end is not fired, and the count below fails): 32 steps a run, not the bench's 44.
    summary = chaos.storm(faults=6, seed=276, work=tmp_path, steps_per_fault=4)
    with capsys.disabled():  # the figures for bench/RESULTS.md "Reliability"
        print(f"\nchaos: {summary}")
    fired, every = summary["faults"], summary["checkpoint_every"]
    assert summary["faults_injected"] == 6 and len(summary["faults_by_kind"]) >= 4, summary
    assert summary["final_step"] == summary["max_steps"] and summary["one_metric_line_per_step"], summary
    assert summary["attempts"][-1]["world_size"] == 2 and summary["params_equal"], summary

    # Each fault's cost: none for a SIGTERM (it checkpoints at the next step boundary) or for an outage within
    # data.s3_retry_seconds (no restart at all); at most checkpoint_every steps for a kill, twice that where the
    # resume passed over a damaged newest checkpoint.
    for fault in fired:
        assert fault["restarts"] == (0 if fault["kind"] == "s3_outage" else 1) or fault["kind"] == "node_loss", fault
    for attempt in summary["attempts"][1:]:
        if attempt["cause"] == "preemption":
            assert attempt["lost_steps"] == 0, attempt
        else:
            assert attempt["cause"] == "failure" and attempt["lost_steps"] <= every * (1 + len(attempt["damaged"] or [])), attempt
    damaged = [a["damaged"][0]["file"] for a in summary["attempts"] if a["damaged"]]
    assert damaged == [f["damaged"] for f in fired if f["kind"] == "damaged_checkpoint"], summary

    # Every fault in failures.json with its class.
    kinds, classes = summary["faults_by_kind"], summary["failures_by_class"]
    assert classes["preemption"] == kinds.get("sigterm_worker", 0), summary
    assert classes["damaged_checkpoint"] == kinds.get("damaged_checkpoint", 0), summary
    assert classes["store_outage"] >= kinds.get("s3_outage", 0), summary
    assert classes["worker_group"] >= sum(kinds.get(k, 0) for k in RESTARTING), summary
