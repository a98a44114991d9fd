"""Rank 0's mirrors of a run where people look: TensorBoard event files in `<run dir>/tensorboard/`
(`log.tensorboard`) and an MLflow run (`log.mlflow`). metrics.jsonl stays the record; these follow it:
every numeric key of every report, the validation metrics among them, a few validation images with their
generated captions and answers at each validation, and the test metrics, samples and report at the end.

A resumed attempt reports again the steps after its checkpoint. Its event file starts with TensorBoard's
purge marker at the first of those steps, so TensorBoard hides what earlier attempts wrote from there on,
as metrics.jsonl drops those lines; MLflow keeps every value logged for a step and plots the latest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from spatialnet_dist.config import Config
from spatialnet_dist.display import displayable, sample_markdown
from spatialnet_dist.errors import UserError, disk_full, is_disk_full
from spatialnet_dist.store import storage
from spatialnet_dist.train.rundir import MLFLOW_RUN_FILE, TENSORBOARD_DIR, RunDir

MLFLOW_DB = "mlflow.db"  # the default store, one per run.storage so that its runs compare in one MLflow UI


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metrics dict as {"a/b": value}; lists, strings and bools left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def mlflow_tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store beside the runs (MLflow 3 refuses its plain file store).
    A run.storage on s3:// needs a tracking server: a store on a worker's disk would be lost with it.
    The driver calls this before any worker starts, so that these errors stop the job at once."""
    if importlib.util.find_spec("mlflow") is None:
        raise UserError("config key log.mlflow: mlflow is not installed (pip install 'spatialnet-dist[mlflow]')")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if storage.is_s3(cfg.run.storage):
        raise UserError(f"config key log.mlflow: run.storage {cfg.run.storage} is on S3, where MLflow cannot keep "
                        "its store; set MLFLOW_TRACKING_URI to a tracking server")
    return f"sqlite:///{Path(cfg.run.storage).resolve() / MLFLOW_DB}"


class _TensorBoard:
    """A SummaryWriter on the run's tensorboard/ folder; on S3 it writes locally and uploads at each flush."""

    def __init__(self, run: RunDir, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.url = run.path(TENSORBOARD_DIR)
        self.local = tempfile.mkdtemp(prefix="spatialnet-tb-") if storage.is_s3(self.url) else self.url
        self.writer = SummaryWriter(self.local, purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def samples(self, step: int, tag: str, samples: list[dict]) -> None:
        # One tag per position: TensorBoard's step slider then shows how sample i's caption evolves.
        for i, sample in enumerate(samples):
            self._image(f"{tag}/{i}", sample["image"], step)
            self.writer.add_text(f"{tag}/{i}", "\n".join(sample_markdown(sample)), step)
            if sample.get("reconstruction") is not None:  # mae's: the image, its visible patches, the reconstruction
                self._image(f"{tag}/{i}/reconstruction", sample["reconstruction"], step)

    def _image(self, tag: str, image, step: int) -> None:
        image = displayable(image)  # (H, W) or (H, W, 3)
        self.writer.add_image(tag, image, step, dataformats="HWC" if image.ndim == 3 else "HW")

    def flush(self) -> None:
        try:
            self.writer.flush()  # a write its thread could not do is raised here: ENOSPC is errors.DiskFull
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.local, "TensorBoard events in") from None
            raise
        if self.local != self.url:
            for name in os.listdir(self.local):
                storage.put_file(os.path.join(self.local, name), storage.join(self.url, name))

    def close(self) -> None:
        self.writer.close()
        self.flush()
        if self.local != self.url:
            shutil.rmtree(self.local, ignore_errors=True)


class _MLflow:
    """One MLflow run per run directory, named in its mlflow.json: a resumed attempt logs to the same run."""

    def __init__(self, cfg: Config, run: RunDir):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = mlflow_tracking_uri(cfg)
        self.client = MlflowClient(uri)
        known_url = run.path(MLFLOW_RUN_FILE)
        known = json.loads(storage.read_bytes(known_url)) if storage.exists(known_url) else {}
        if known.get("tracking_uri") == uri:
            self.run_id = known["run_id"]
            return
        self.run_id = self.client.create_run(self._experiment_id(cfg, uri), run_name=cfg.run.name,
                                             tags={"spatialnet.run_dir": run.url}).info.run_id
        params = config_params(cfg.to_dict())
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        self.client.log_text(self.run_id, cfg.to_yaml(), "config.yaml")
        storage.write_bytes_atomic(known_url, json.dumps({"tracking_uri": uri, "run_id": self.run_id}).encode())

    def _experiment_id(self, cfg: Config, uri: str) -> str:
        from mlflow.exceptions import MlflowException

        name = cfg.log.mlflow_experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # The default SQLite store's artifacts sit beside it; a server (or a store the user named) decides its own.
        artifacts = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow refuses keys with other characters than these; class names ("per_class/...") may hold them.
        metrics = [Metric(re.sub(r"[^\w\-. /]", "_", k), v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


def config_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: {"train.max_steps": "300", "optim.betas": "[0.9, 0.999]", ...}."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(config_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


class RunTracker:
    """Rank 0 opens one per attempt, once it knows the step the attempt starts at (0, or the resumed one)."""

    def __init__(self, cfg: Config, run: RunDir, start_step: int):
        self.last_step = start_step
        self._tensorboard = _TensorBoard(run, purge_step=start_step + 1) if cfg.log.tensorboard else None
        self._mlflow = _MLflow(cfg, run) if cfg.log.mlflow else None  # mlflow is imported only here

    def _sinks(self) -> list:
        return [s for s in (self._tensorboard, self._mlflow) if s is not None]

    def log_metrics(self, step: int, metrics: dict) -> None:
        """One report, as metrics.jsonl has it: every numeric key but the step itself."""
        values = {k: v for k, v in scalars(metrics).items() if k != "step"}
        for sink in self._sinks():
            sink.scalars(step, values)
        if self._tensorboard:
            self._tensorboard.flush()
        self.last_step = step

    def log_samples(self, step: int, samples: list[dict], tag: str = "val_samples") -> None:
        """A few images with their generated captions and answers (evaluate.report's sample format)."""
        if self._tensorboard:
            self._tensorboard.samples(step, tag, samples)
            self._tensorboard.flush()

    def log_evaluation(self, metrics: dict, samples: list[dict], local_dir: Path, split: str) -> None:
        """The end-of-run evaluation, at the last step: its metrics as `<split>/<task>/<key>` scalars,
        its sample images, and (MLflow) the folder with report.md, its plots and the predictions."""
        values = scalars(metrics, f"{split}/")
        for sink in self._sinks():
            sink.scalars(self.last_step, values)
        self.log_samples(self.last_step, samples, f"{split}_samples")
        if self._mlflow:
            self._mlflow.artifacts(local_dir, "eval")

    def close(self) -> None:
        for sink in self._sinks():
            sink.close()
