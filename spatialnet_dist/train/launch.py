"""Launch a training job: config -> data check -> vocabularies -> Ray TorchTrainer -> RESULT line.

`python ray_job.py` and `spatialnet train` both call `main(argv)`. Everything that can be wrong with
the input (config, data, storage) is checked here, before any worker starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from spatialnet_dist import config as config_mod
from spatialnet_dist.errors import UserError
from spatialnet_dist.store import storage

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
# Non-secret settings the workers need; credentials reach them through the node's environment or
# instance roles, never through the job's config.
WORKER_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
              "AWS_REGION", "AWS_PROFILE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
log = logging.getLogger("spatialnet.launch")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ray_job.py", description="Train SpatialNet-ViT with Ray Train + DeepSpeed.")
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name}, the demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable; values are YAML)")
    p.add_argument("--resume", default=None, help="start from this checkpoint URL (weights + optimizer state)")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> config_mod.Config:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = config_mod.load(path, overrides)
    # Workers run in Ray's own working directory: hand them absolute local paths.
    for section, key in (("data", "root"), ("run", "storage"), ("train", "resume"), ("model", "pretrained")):
        value = getattr(getattr(cfg, section), key)
        if value and value != "hub" and not storage.is_s3(value):
            setattr(getattr(cfg, section), key, str(Path(value).resolve()))
    return cfg


def prepare_data(cfg: config_mod.Config) -> None:
    """Generate the synthetic demo corpus on first use; any other corpus must already be converted."""
    from spatialnet_dist.store.manifest import manifest_url

    corpora = {c for t in cfg.tasks.enabled() for c in getattr(cfg.tasks, t).corpora}
    for corpus in sorted(corpora):
        if storage.exists(manifest_url(cfg.data.root, corpus)):
            continue
        if corpus != "synthetic":
            raise UserError(f"corpus {corpus}: no {manifest_url(cfg.data.root, corpus)}; convert it first "
                            f"(spatialnet shards convert ADAPTER SRC {cfg.data.root} --name {corpus})")
        from spatialnet_dist.corpora.synthetic import write_synthetic

        print(f"generating the synthetic corpus ({cfg.data.synth_images} images) under {cfg.data.root} ...",
              flush=True)
        write_synthetic(cfg.data.root, images=cfg.data.synth_images, seed=cfg.data.synth_seed)


def storage_for_ray(url: str):
    """(storage_path, storage_filesystem) for RunConfig; S3-compatible endpoints need an explicit filesystem."""
    if not storage.is_s3(url):
        return str(Path(url).resolve()), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return url, None
    scheme, _, host = endpoint.partition("://")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme,
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return url[len("s3://"):], fs


def connect_ray(cfg: config_mod.Config) -> bool:
    """Join RAY_ADDRESS or a cluster running here; else start a local instance bound to 127.0.0.1.
    -> True when this call started Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    if not cfg.train.use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    runtime_env = {"env_vars": env}
    if os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")  # a submitted job's env_vars: merge, don't refuse
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
        return True
    needed = cfg.train.num_workers * cfg.train.cpus_per_worker
    # Ray starts its workers at nice 15: on a shared machine anything else would starve the trainers.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # The dashboard also serves Ray's state API (Ray Train's controller polls it); loopback only.
    ray.init(_node_ip_address="127.0.0.1", num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=True,
             dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=True)
    return True


def run_training(cfg: config_mod.Config, vocab: dict, run_dir: str):
    """TorchTrainer.fit() -> Ray's Result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from spatialnet_dist.train.worker import train_loop_per_worker

    storage_path, filesystem = storage_for_ray(cfg.run.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "vocab": vocab, "run_dir": run_dir},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # No checkpoint_config: run.keep_checkpoints is applied by train.checkpoint.prune, on every path.
        ),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args)
        if cfg.eval.at_end and cfg.tasks.captioning.enabled:
            from spatialnet_dist.evaluate.captions import require_java

            require_java()  # refuse now rather than after training
        prepare_data(cfg)
        from spatialnet_dist.data.vocab import build_vocabs
        from spatialnet_dist.train.checkpoint import latest_complete
        from spatialnet_dist.train.plan import resolve
        from spatialnet_dist.train.rundir import RunDir

        cfg, plan = resolve(cfg, cfg.train.num_workers)
        if plan:
            print(plan, flush=True)

        vocabs = build_vocabs(cfg)
        run = RunDir(storage.join(cfg.run.storage, cfg.run.name))
        run.write_config(cfg)  # also proves the run storage is writable (a missing bucket stops here)
        attempts_before = len(run.attempts())
    except UserError as e:
        print(f"spatialnet: error: {e}", file=sys.stderr)
        return 2

    started = connect_ray(cfg)
    t0 = time.time()
    error = None
    try:
        result = run_training(cfg, vocabs.to_dict(), run.url)
        error = result.error
    except Exception as e:  # Ray raises TrainingFailedError when the retries are spent
        result, error = None, e
    finally:
        if started:
            import ray

            ray.shutdown()

    attempts = run.attempts()[attempts_before:]
    metrics = run.metrics()
    eval_url = run.path("eval", "metrics.json")
    summary = {
        "final_step": metrics[-1]["step"] if metrics else 0,
        "restarts": max(0, len(attempts) - 1),
        "resumed_from": [a["start_step"] for a in attempts if a["resumed"]],
        "checkpoint": latest_complete(run.url),
        "run_dir": run.url,
        "eval": json.loads(storage.read_bytes(eval_url)) if cfg.eval.at_end and storage.exists(eval_url) else None,
        "wall_s": round(time.time() - t0, 1),
    }
    if error is not None:
        summary["error"] = str(error).strip().splitlines()[0][:500] if str(error).strip() else type(error).__name__
        print(f"spatialnet: training failed: {summary['error']}", file=sys.stderr)
    print("RESULT " + json.dumps(summary), flush=True)
    return 1 if error is not None else 0
