"""Joining or starting Ray, the one way for every part that runs Ray work (training, evaluation spread over
workers, conversion with --ray): RAY_ADDRESS or a cluster running here, else a local instance on loopback
with token auth. Below store/, train/ and evaluate/, which all use it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Non-secret settings the workers need; credentials reach them through the node's environment or
# instance roles, never through the job's config.
WORKER_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
              "AWS_REGION", "AWS_PROFILE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "MLFLOW_TRACKING_URI")
DEFAULT_RAY_TOKEN = Path.home() / ".ray" / "auth_token"  # where Ray 2.60 keeps the token it generates
log = logging.getLogger("spatialnet.ray")


def connect_ray(cpus_needed: int = 1, use_gpu: bool = False) -> bool:
    """Join RAY_ADDRESS or a cluster running here; else start a local instance bound to 127.0.0.1 with at
    least `cpus_needed` CPUs. -> True when this call started Ray (and so should shut it down)."""
    # Ray 2.60 replaces _node_ip_address=127.0.0.1 by the host's routable address unless it is told the
    # instance is single-machine: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read by the Ray processes we start,
    # and by ray_constants when first imported; set on the module too for a process that imported ray already).
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    if local:
        ray_constants.ENABLE_RAY_CLUSTER = False
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    runtime_env = {"env_vars": env}
    if not local:
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")  # a submitted job's env_vars: merge, don't refuse
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
        return True
    # Ray starts its workers at nice 15: on a shared machine anything else would starve the trainers.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Token auth on: Ray 2.60 turns it on for a new local instance (and creates ~/.ray/auth_token) unless
    # RAY_AUTH_MODE says otherwise, so an inherited RAY_AUTH_MODE=disabled must not reach it.
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        log.warning("RAY_AUTH_MODE=%s ignored: the local Ray instance always uses token auth",
                    os.environ.pop("RAY_AUTH_MODE"))
    # Loopback for every address Ray lets us choose: the node's (GCS, raylet, object manager and agents
    # advertise it; metrics servers bind it) and the dashboard's, which also serves Ray's state API (Ray Train's
    # controller polls it). cluster/README.md says what remains open.
    ray.init(_node_ip_address="127.0.0.1", num_cpus=max(cpus_needed, os.cpu_count() or 1), include_dashboard=True,
             dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=True)
    if DEFAULT_RAY_TOKEN.is_file() and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        DEFAULT_RAY_TOKEN.chmod(0o600)  # Ray writes it with the default umask; it is a password
    return True
