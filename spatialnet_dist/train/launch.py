"""Launch a training job: config -> preflight -> vocabularies -> Ray TorchTrainer -> RESULT line.

`python ray_job.py` and `spatialnet train` both call `main(argv, train_loop)` through spatialnet_dist.jobs,
which binds evaluate/'s validation and end-of-run evaluation into Ray Train's per-worker function.
Everything that can be wrong with the input (config, data, sources, storage, java: train.preflight) is
checked here, before any worker starts. RESULT's "error" is null on success, else the failing worker's
one-line reason, which is also the last line of stderr (train.failures says which failures end a run at once).
A run directory that already holds the finished run the job asks for (its steps done, evaluated) starts nothing:
its RESULT line again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from spatialnet_dist import config as config_mod
from spatialnet_dist import ray_cluster, versions
from spatialnet_dist.errors import DiskFull, UserError
from spatialnet_dist.store import storage

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
# Ray Train's record of the checkpoints reported to it, in the run directory. Jobs before Ray got metrics only
# (train.worker.RayReporter) wrote one naming checkpoints that run.keep_checkpoints pruned since, and Ray Train
# refuses to start in a run directory whose record names a missing checkpoint.
RAY_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"
log = logging.getLogger("spatialnet.launch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray_job.py", description="Train SpatialNet-ViT with Ray Train + DeepSpeed.")
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name}, the demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable; values are YAML)")
    p.add_argument("--resume", default=None, help="start from this checkpoint URL (weights + optimizer state)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_config(args: argparse.Namespace) -> config_mod.Config:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = config_mod.load(path, overrides)
    # Workers run in Ray's own working directory: hand them absolute local paths.
    for section, key in (("data", "root"), ("run", "storage"), ("train", "resume"), ("model", "pretrained")):
        value = getattr(getattr(cfg, section), key)
        if value and value != "hub" and not storage.is_s3(value):
            setattr(getattr(cfg, section), key, str(Path(value).resolve()))
    storage.set_retry_budget(cfg.data.s3_retry_seconds)
    return cfg


def prepare_data(cfg: config_mod.Config) -> None:
    """Generate the synthetic demo corpus on first use (preflight refuses any other missing corpus)."""
    from spatialnet_dist.store.manifest import manifest_url

    uses_synthetic = (any("synthetic" in getattr(cfg.tasks, t).corpora for t in cfg.tasks.enabled())
                      or cfg.eval.knn.corpus == "synthetic")
    if uses_synthetic and not storage.exists(manifest_url(cfg.data.root, "synthetic")):
        from spatialnet_dist.corpora.synthetic import write_synthetic

        print(f"generating the synthetic corpus ({cfg.data.synth_images} images) under {cfg.data.root} ...",
              flush=True)
        write_synthetic(cfg.data.root, images=cfg.data.synth_images, seed=cfg.data.synth_seed)


def storage_for_ray(url: str, retry_seconds: float):
    """(storage_path, storage_filesystem) for RunConfig. On S3, Ray's checkpoint uploads and snapshots retry
    through an outage for about `retry_seconds` (data.s3_retry_seconds), as storage's operations do; the AWS
    SDK's default strategy waits 25 ms x 2^k before retry k, so n retries wait 25 ms x (2^n - 2) in all."""
    if not storage.is_s3(url):
        return str(Path(url).resolve()), None
    import pyarrow.fs

    retries = max(3, math.ceil(math.log2(retry_seconds / 0.025 + 2)))
    options = {"retry_strategy": pyarrow.fs.AwsDefaultS3RetryStrategy(max_attempts=retries)}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    endpoint = os.environ.get("AWS_ENDPOINT_URL")  # S3-compatible endpoints (MinIO, moto) are named explicitly
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host, scheme=scheme, region=region or "us-east-1")
    return url[len("s3://"):], pyarrow.fs.S3FileSystem(**options)


def connect_ray(cfg: config_mod.Config) -> bool:
    """ray_cluster.connect_ray with the CPUs the most training workers need (an elastic run starts with what
    fits of them, at least its minimum). -> True when this call started Ray."""
    return ray_cluster.connect_ray(cfg.train.worker_range[1] * cfg.train.cpus_per_worker, cfg.train.use_gpu)


def check_world_sizes(cfg: config_mod.Config) -> None:
    """Every size an elastic group may take keeps each task's global batch (one line naming the key, now
    rather than in a worker group that has lost a node)."""
    from spatialnet_dist.train.plan import for_world

    low, high = cfg.train.worker_range
    for world_size in range(low, high + 1):
        for_world(cfg, world_size)


def run_training(cfg: config_mod.Config, vocab: dict, run_dir: str, train_loop: Callable[[dict], None]):
    """TorchTrainer.fit() -> Ray's Result. `train_loop`: train.worker.train_loop_per_worker with its
    validation and evaluation bound, a module-level function (Ray pickles it by reference)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from spatialnet_dist.train.failures import FailureClassifier
    from spatialnet_dist.train.preemption import SigtermHandler

    storage.delete(storage.join(run_dir, RAY_CHECKPOINT_RECORD))  # nothing reads it: resume goes by the run's own
    storage_path, filesystem = storage_for_ray(cfg.run.storage, cfg.data.s3_retry_seconds)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "vocab": vocab, "run_dir": run_dir},
        scaling_config=ScalingConfig(
            num_workers=tuple(cfg.train.worker_range) if cfg.train.elastic else cfg.train.num_workers,
            elastic_resize_monitor_interval_s=cfg.train.elastic_resize_check_s,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # Pre-emptions (a drained node, a SIGTERM: train.preemption) have their own budget, unlimited.
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # No checkpoint_config: Ray registers no checkpoint; checkpoint.py publishes, prunes and resumes them.
            callbacks=[FailureClassifier(run_dir),  # permanent failures end the run on this attempt
                       SigtermHandler(cfg.train.preemption_grace_s)],
        ),
    )
    return trainer.fit()


def report_complete(run, result: dict) -> int:
    """A job asked of a run that has nothing left to do (RunDir.completed) starts no worker: it says so, how to
    train another, and prints the run's RESULT line again (from result.json). -> the exit code, 0."""
    print(f"{run.url}: this run is complete at step {result['final_step']}, nothing left to do. A fresh run: "
          f"--set run.name=<another name>, or delete {run.url}; more steps: --set train.max_steps=<more>", flush=True)
    print("RESULT " + json.dumps({k: v for k, v in result.items() if k != "ended"}), flush=True)
    return 0


def main(argv: list[str] | None, train_loop: Callable[[dict], None]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args)
        from spatialnet_dist.train import preflight

        versions.require_all(unused=preflight.unused_packages(cfg))
        if cfg.log.mlflow:
            from spatialnet_dist.train.tracking import mlflow_tracking_uri

            mlflow_tracking_uri(cfg)  # an S3 run.storage without a tracking server stops now
        prepare_data(cfg)
        from spatialnet_dist.checkpoint import latest_complete, resumed_meta
        from spatialnet_dist.data.vocab import build_vocabs
        from spatialnet_dist.train.plan import resolve
        from spatialnet_dist.train.rundir import BestCheckpoint, RunDir

        run = RunDir(storage.join(cfg.run.storage, cfg.run.name))
        preflight.run_all(cfg, run.url)
        # A resumed run keeps the global batch its checkpoint recorded; planned for the most workers (an elastic
        # group's workers take their share again at the size it has), checked for every size it may take.
        cfg, plan = resolve(cfg, cfg.train.worker_range[1], resumed_meta(run.url, cfg.train.resume))
        finished = run.completed(cfg.train.max_steps, cfg.eval.at_end)
        if finished is not None:
            return report_complete(run, finished)
        check_world_sizes(cfg)
        if plan:
            print(plan, flush=True)

        vocabs = build_vocabs(cfg)
        run.write_config(cfg)
        attempts_before = len(run.attempts())
    except UserError as e:
        print(f"spatialnet: error: {e}", file=sys.stderr)
        return 2

    from spatialnet_dist.train.failures import reason

    started = connect_ray(cfg)
    t0 = time.time()
    error = None
    try:
        result = run_training(cfg, vocabs.to_dict(), run.url, train_loop)
        error = result.error
    except Exception as e:  # TrainingFailedError: a permanent failure, or the retries are spent
        result, error = None, e
    finally:
        if started:
            import ray

            ray.shutdown()

    attempts = run.attempts()[attempts_before:]
    metrics = run.metrics()
    eval_url = run.path("eval", "metrics.json")
    best = BestCheckpoint(run, cfg.eval.keep_best)
    summary = {
        "final_step": metrics[-1]["step"] if metrics else 0,
        "restarts": max(0, len(attempts) - 1),
        "resumed_from": [a["start_step"] for a in attempts if a["resumed"]],
        "lost_steps": [a.get("lost_steps", 0) for a in attempts[1:]],  # one per restart
        "restart_causes": [a.get("cause") for a in attempts[1:]],
        # passed over by a resume, set aside for inspection: [{"checkpoint", "file", "set_aside"}]
        "damaged_checkpoints": [d for a in attempts for d in a.get("damaged", [])],
        "world_sizes": [a.get("world_size") for a in attempts],
        "checkpoint": best.url or latest_complete(run.url),  # eval.keep_best's best, else the last
        "best_step": best.step,  # null: eval.keep_best off, or nothing validated
        "run_dir": run.url,
        "eval": json.loads(storage.read_bytes(eval_url)) if cfg.eval.at_end and storage.exists(eval_url) else None,
        "wall_s": round(time.time() - t0, 1),
        "error": None if error is None else reason(error),
    }
    if error is not None:
        sys.stdout.flush()
        print(f"spatialnet: training failed: {summary['error']}", file=sys.stderr, flush=True)
    try:
        run.write_result(summary)
    except DiskFull as e:  # the run directory's disk is full: RESULT still says how the run ended
        print(f"spatialnet: result.json not written: {e}", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(summary), flush=True)
    return 1 if error is not None else 0
