"""The run directory `<run.storage>/<run.name>/` (local or s3://), apart from its checkpoints:

  config.yaml     the resolved config (written by the driver before any worker starts)
  metrics.jsonl   one line per report (rank 0), never a step twice: a resumed attempt first drops
                  the lines past the step it resumes at; rewritten whole through a temp file, so a full disk
                  (errors.DiskFull, naming it) leaves the lines before, never half a line
  attempts.json   one entry per worker-group start: the step it started at, whether it resumed, its number of
                  workers, the cause of the restart when it can be told (failure: failures.json has one since the
                  attempt before; preemption: the attempt before checkpointed on a SIGTERM and handed over; resize:
                  an elastic group changed size with no failure; start: the run dir's first attempt), and when it
                  resumed: the checkpoint, the workers that wrote it, whether it was resharded, the damaged
                  checkpoints it passed over, and lost_steps (steps the attempt before reached past that start,
                  then lost)
  failures.json   one entry per fault, each with its class, step and one-line reason: a failed worker group
                  (worker_group; step null when unknown, e.g. a killed process; train.failures decides from it
                  whether a step failed twice), a damaged checkpoint a resume passed over (damaged_checkpoint: the
                  checkpoint, the file, where it was set aside), a SIGTERM checkpointed on (preemption), an S3
                  outage rank 0 rode out (store_outage: its seconds and the first URL it held up)
  faults/         markers of test faults already fired (faults.fail_at_step fires once per run)
  result.json     the job's RESULT summary, written by the driver when the job ends (`error`: null or why it failed)
  best.json       eval.keep_best: the best validated checkpoint so far, {"step", "metric", "value"} (rank 0, once
                  that checkpoint is complete); pruning keeps it, the end-of-run evaluation loads it
  tensorboard/    TensorBoard event files, one per attempt (train/tracking.py; log.tensorboard)
  mlflow.json     the MLflow run this run logs to (log.mlflow)
  eval/           metrics.json, predictions/, report.md and its figures
Beside these: checkpoint-NNNNNN/ (spatialnet_dist.checkpoint: complete once its manifest.json is written; a
restart resumes from the last complete one that verifies; Ray Train is told of none, so its run snapshot
checkpoint_manager_snapshot.json never names one) and checkpoint-NNNNNN.damaged-K/ (one that did not verify, kept for
inspection).
"""

from __future__ import annotations

import json
import math
import re
import time

import yaml

from spatialnet_dist import tasks as registry
from spatialnet_dist.config import Config
from spatialnet_dist.errors import UserError
from spatialnet_dist.store import storage

CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")  # Ray's own checkpoint_tmp* folders are not checkpoints
TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow.json"  # {"tracking_uri", "run_id"}: the MLflow run this run directory logs to
BEST_FILE = "best.json"
# The classes of failures.json's entries (what a fault is recorded as): a failed worker group (a killed process, a
# lost node, an error), a checkpoint a resume passed over, a SIGTERM the run checkpointed on and handed over, and an
# S3 outage rank 0 rode out (its operations retried within data.s3_retry_seconds).
FAILURE_CLASSES = FAILED_GROUP, DAMAGED_CHECKPOINT, PREEMPTION, STORE_OUTAGE = (
    "worker_group", "damaged_checkpoint", "preemption", "store_outage")


def _name(url: str) -> str:
    """The last part of a URL: how the run directory's entries are matched, whatever path named the run."""
    return url.rstrip("/").rsplit("/", 1)[-1]


class RunDir:
    def __init__(self, url: str):
        self.url = url
        self._written: list[dict] | None = None  # metrics.jsonl as this object last wrote it

    def path(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    def _read_text(self, name: str) -> str:
        url = self.path(name)
        return storage.read_bytes(url).decode() if storage.exists(url) else ""

    def write_config(self, cfg: Config) -> None:
        storage.write_bytes_atomic(self.path("config.yaml"), cfg.to_yaml().encode())

    # ---- metrics.jsonl ----

    def metrics(self) -> list[dict]:
        """The reports, one per line. A torn last line (no newline after it: a writer of another tool, or a disk
        that filled mid-append) is left out; any other line that is not JSON is an error, as before."""
        text = self._read_text("metrics.jsonl")
        lines = text.splitlines()
        torn = lines[-1] if lines and not text.endswith("\n") else None
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                if torn is None or i != len(lines) - 1:
                    raise
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines past `after_step`: the resumed attempt reports those steps again."""
        lines = [m for m in self.metrics() if m.get("step", 0) <= after_step]
        self._write_metrics(lines)

    def append_metrics(self, record: dict) -> None:
        # Rewritten whole and atomically: objects cannot be appended to, and a reader never sees half a line.
        # Rank 0 is the file's one writer, so what it last wrote is what the file holds: no read per report.
        self._write_metrics([*(self.metrics() if self._written is None else self._written), record])

    def _write_metrics(self, records: list[dict]) -> None:
        body = "".join(json.dumps(r) + "\n" for r in records)
        storage.write_bytes_atomic(self.path("metrics.jsonl"), body.encode())
        self._written = records

    # ---- attempts.json ----

    def attempts(self) -> list[dict]:
        text = self._read_text("attempts.json")
        return json.loads(text) if text else []

    def last_step_reached(self) -> int:
        """The last step the latest attempt is known to have trained: the last report in metrics.jsonl (cut back
        at each attempt's start), or a later failed step failures.json names since that attempt began (an older
        one was lost by an attempt before, and counted then). Read before a new attempt truncates metrics.jsonl."""
        attempts = self.attempts()
        since = attempts[-1]["time"] if attempts else 0.0
        failed = [f["step"] for f in self.failures() if f["step"] and f["time"] >= since]
        return max([m.get("step", 0) for m in self.metrics()] + failed, default=0)

    def start_attempt(self, step: int, resumed: dict | None, world_size: int) -> list[str]:
        """Rank 0 at an attempt's start (`resumed`: what checkpoint.resume says it resumed): the attempt
        record with the steps the attempt before lost, metrics.jsonl cut back to `step`, a failures.json entry
        per damaged checkpoint passed over. -> the lines to log: one per damaged checkpoint, then the resume
        line (none on a fresh start)."""
        from spatialnet_dist.checkpoint import describe_resume

        lost = max(0, self.last_step_reached() - step)
        self.truncate_metrics(step)
        damaged = resumed["damaged"] if resumed else []
        facts = {k: resumed[k] for k in ("checkpoint", "written_by", "resharded")} if resumed else {}
        if damaged:
            facts["damaged"] = [{k: d[k] for k in ("checkpoint", "file", "set_aside")} for d in damaged]
        self.record_attempt(step, resumed is not None, world_size, lost, **facts)
        for d in damaged:  # after the attempt's record: its own cause is the one before's
            self.record_failure(None, d["reason"], DAMAGED_CHECKPOINT, **{k: d[k] for k in ("checkpoint", "file",
                                                                                            "set_aside")})
        lines = [f"{d['reason']}; passed over, set aside as {d['set_aside']}" for d in damaged]
        return lines + [f"{describe_resume(resumed)}; {lost} steps lost since"] if resumed else lines

    def record_attempt(self, start_step: int, resumed: bool, world_size: int, lost_steps: int = 0, **facts) -> None:
        """facts: what `checkpoint.resume` says it resumed (checkpoint, written_by, resharded, damaged)."""
        entries = self.attempts()
        cause = "start"
        if entries:
            before = entries[-1]
            if before.get("ended") == "preemption":
                cause = "preemption"
            elif any(f["time"] >= before["time"] for f in self.failures()):
                cause = "failure"
            elif before.get("world_size") != world_size:
                cause = "resize"
            else:
                cause = None  # e.g. a new job in this run directory
        entries.append({"start_step": start_step, "resumed": resumed, "world_size": world_size, "cause": cause,
                        "lost_steps": lost_steps, **facts, "time": time.time()})
        self._write_attempts(entries)

    def end_attempt(self, how: str, step: int) -> None:
        """The running attempt ends `how` (preemption) after checkpointing `step`; failures.json says so too."""
        entries = self.attempts()
        entries[-1].update(ended=how, end_step=step)
        self._write_attempts(entries)
        self.record_failure(step, f"SIGTERM: checkpointed at step {step} and handed over", PREEMPTION)

    def record_outages(self, step: int) -> list[str]:
        """The S3 outages this process rode out since the last call, one failures.json entry each, recorded
        after `step`. -> a line to log per outage."""
        lines = []
        for o in storage.take_outages():
            why = f"S3 endpoint {o['endpoint']} failing for {o['seconds']:g} s ({o['cause']}), ridden out"
            self.record_failure(step, why, STORE_OUTAGE, seconds=o["seconds"], url=o["url"], start=o["start"])
            lines.append(f"{why} (first held up: {o['url']})")
        return lines

    def _write_attempts(self, entries: list[dict]) -> None:
        storage.write_bytes_atomic(self.path("attempts.json"), json.dumps(entries, indent=1).encode())

    # ---- failures.json ----

    def failures(self, kind: str = FAILED_GROUP) -> list[dict]:
        """The entries of one class: failed worker groups (what restart causes, lost steps and a step failing twice
        go by; an entry without a class is one) or damaged checkpoints."""
        text = self._read_text("failures.json")
        return [f for f in (json.loads(text) if text else []) if f.get("class", FAILED_GROUP) == kind]

    def record_failure(self, step: int | None, reason: str, kind: str = FAILED_GROUP, **facts) -> None:
        text = self._read_text("failures.json")
        entry = {"class": kind, "step": step, "reason": reason, **facts, "time": time.time()}
        storage.write_bytes_atomic(self.path("failures.json"),
                                   json.dumps([*(json.loads(text) if text else []), entry], indent=1).encode())

    # ---- result.json ----

    def write_result(self, summary: dict) -> None:
        record = {"ended": time.time(), **summary}
        storage.write_bytes_atomic(self.path("result.json"), json.dumps(record, indent=1).encode())

    def result(self) -> dict | None:
        text = self._read_text("result.json")
        return json.loads(text) if text else None

    def completed(self, max_steps: int, evaluated: bool) -> dict | None:
        """result.json when a job with this `max_steps` (and, `evaluated`, eval.at_end) has nothing left to do
        here: the run finished (describe's state) without an error at that step, evaluated when asked; else None
        (a new run, or one to go on with: unfinished, failed, or given more steps)."""
        result = self.result()
        if _state(self.attempts(), result) != "finished" or result.get("final_step") != max_steps:
            return None
        return result if result.get("eval") is not None or not evaluated else None

    # ---- best.json ----

    def best(self, metric: str) -> dict | None:
        """best.json when it ranks by `metric` (eval.keep_best), else None: an earlier job in this run directory
        that kept the best by another metric, or none, leaves nothing to go by."""
        text = self._read_text(BEST_FILE)
        record = json.loads(text) if text else None
        return record if record and record["metric"] == metric else None

    def write_best(self, record: dict) -> None:
        storage.write_bytes_atomic(self.path(BEST_FILE), json.dumps(record, indent=1).encode())

    # ---- faults ----

    def claim_fault(self, step: int) -> bool:
        """True the first time for this step in this run (then the marker says it fired)."""
        marker = self.path("faults", f"fail_at_step-{step}")
        if storage.exists(marker):
            return False
        storage.write_bytes_atomic(marker, str(time.time()).encode())
        return True

    # ---- what `spatialnet runs` shows ----

    def describe(self) -> dict:
        """{"run_dir", "state", "last_step", "max_steps", "last_metrics", "checkpoints", "damaged_checkpoints" (set
        aside: [{"checkpoint", "file"}]), "report", "error", "attempts", "tensorboard", "best_step" (eval.keep_best's,
        or None)}. state: created (config only), running
        (started, no result since: running, or its driver was killed), finished or failed (the job's result.json,
        newer than its last start)."""
        names = storage.list_dir(self.url)
        if "config.yaml" not in names:
            raise UserError(f"{self.url}: not a run directory (no config.yaml)")
        config = yaml.safe_load(self._read_text("config.yaml")) or {}
        metrics, attempts, result = self.metrics(), self.attempts(), self.result()
        state = _state(attempts, result)
        report = self.path("eval", "report.md")
        return {
            "run_dir": self.url,
            "state": state,
            "last_step": metrics[-1].get("step", 0) if metrics else 0,
            "max_steps": config.get("train", {}).get("max_steps"),
            "last_metrics": metrics[-1] if metrics else {},
            "checkpoints": [self.path(n) for n in names if CHECKPOINT_NAME.fullmatch(n)],
            "damaged_checkpoints": self._damaged_checkpoints(),
            "report": report if storage.exists(report) else None,
            "error": result.get("error") if state == "failed" else None,
            "attempts": len(attempts),
            "tensorboard": self.path(TENSORBOARD_DIR) if TENSORBOARD_DIR in names else None,
            "best_step": BestCheckpoint(self, config.get("eval", {}).get("keep_best", "")).step,
        }


    def _damaged_checkpoints(self) -> list[dict]:
        """The damaged checkpoints set aside here, each with the file that failed (failures.json; None: unrecorded)."""
        from spatialnet_dist.checkpoint import damaged_checkpoints

        files = {_name(f["set_aside"]): f["file"] for f in self.failures(DAMAGED_CHECKPOINT)}
        return [{"checkpoint": url, "file": files.get(_name(url))} for url in damaged_checkpoints(self.url)]


def _state(attempts: list[dict], result: dict | None) -> str:
    """A run directory's state from its attempts.json and result.json (RunDir.describe says what each means)."""
    if result is not None and (not attempts or result.get("ended", 0) >= attempts[-1]["time"]):
        return "failed" if result.get("error") else "finished"
    return "running" if attempts else "created"


class BestCheckpoint:
    """eval.keep_best on rank 0: the best validated checkpoint so far (best.json: a resumed run goes on from
    it), replaced by a newly published checkpoint whose validation metric beats it (strictly: a tie keeps the
    earlier). Off (`metric` ""): never any."""

    def __init__(self, run: RunDir, metric: str):
        from spatialnet_dist.checkpoint import MANIFEST

        self.run, self.metric = run, metric
        self.higher = registry.higher_is_better(metric)
        self.record = run.best(metric) if metric else None
        if self.record and not storage.exists(storage.join(self.url, MANIFEST)):
            self.record = None  # pruned since by a job of this run directory without eval.keep_best

    @property
    def step(self) -> int | None:
        return self.record["step"] if self.record else None

    @property
    def url(self) -> str | None:
        """The best checkpoint's URL (pruning keeps it), or None."""
        from spatialnet_dist.checkpoint import checkpoint_name

        return self.run.path(checkpoint_name(self.step)) if self.record else None

    def consider(self, step: int, metrics: dict) -> None:
        """After the checkpoint of `step` is published (complete): is its validation the best so far?"""
        value = metrics.get(f"val/{self.metric}") if self.metric else None
        if value is None or not math.isfinite(value):  # not a validation step, or nothing scored
            return
        if self.record is not None:
            best = self.record["value"]
            if not (value > best if self.higher else value < best):
                return
        self.record = {"step": step, "metric": self.metric, "value": value}
        self.run.write_best(self.record)


def list_runs(root: str) -> list[dict]:
    """describe() of every run directory (a folder with a config.yaml) directly under a run.storage root."""
    names = storage.list_dir(root)
    runs = [RunDir(storage.join(root, name)) for name in names]
    return [run.describe() for run in runs if storage.exists(run.path("config.yaml"))]
