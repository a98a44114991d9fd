"""The run directory `<run.storage>/<run.name>/` (local or s3://), apart from its checkpoints:

  config.yaml     the resolved config (written by the driver before any worker starts)
  metrics.jsonl   one line per report (rank 0), never a step twice: a resumed attempt first drops
                  the lines past the step it resumes at
  attempts.json   one entry per worker-group start: the step it started at and whether it resumed
  faults/         markers of test faults already fired (faults.fail_at_step fires once per run)
  eval/           metrics.json, predictions/, report.md and its figures
Beside these: checkpoint-NNNNNN/ (train.checkpoint: complete once its manifest.json is written; a
restart resumes from the last complete one) and, on the Ray path, Ray Train's
checkpoint_manager_snapshot.json (the checkpoints reported to it).
"""

from __future__ import annotations

import json
import time

from spatialnet_dist.config import Config
from spatialnet_dist.store import storage


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
        return [json.loads(line) for line in self._read_text("metrics.jsonl").splitlines() if line.strip()]

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

    def record_attempt(self, start_step: int, resumed: bool) -> None:
        entries = [*self.attempts(), {"start_step": start_step, "resumed": resumed, "time": time.time()}]
        storage.write_bytes_atomic(self.path("attempts.json"), json.dumps(entries, indent=1).encode())

    def ray_registered(self, checkpoint_name: str) -> bool:
        """Whether Ray Train has registered the checkpoint directory `checkpoint_name` of this run."""
        return f'"{checkpoint_name}"' in self._read_text("checkpoint_manager_snapshot.json")

    # ---- faults ----

    def claim_fault(self, step: int) -> bool:
        """True the first time for this step in this run (then the marker says it fired)."""
        marker = self.path("faults", f"fail_at_step-{step}")
        if storage.exists(marker):
            return False
        storage.write_bytes_atomic(marker, str(time.time()).encode())
        return True
