"""cluster/: the launcher YAML against Ray's own schema, the KubeRay manifests field by field, and a real
`ray job submit` of ray_job.py to a token-protected local head started by cluster/start-local-head.sh."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import RAY_BIN, REPO, http_status

CLUSTER = REPO / "cluster"
RAY_VERSION = importlib.metadata.version("ray")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# --- Ray cluster launcher -------------------------------------------------------------------------------


def test_launcher_yaml_validates_against_rays_schema():
    cfg = load("ray-cluster.yaml")
    schema_path = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))
    # What `ray up` itself does before touching the cloud: fill in the provider's defaults, validate again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_launcher_yaml_has_cpu_head_gpu_workers_and_constrained_installs():
    from ray.autoscaler._private.util import prepare_config

    cfg = load("ray-cluster.yaml")
    assert cfg["cluster_name"] and cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "training workers must not land on the head"
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] > 0 for t in gpu_types)

    # Every pip install that will run on a node (the launcher's defaults included) goes through constraints.txt.
    full = prepare_config(copy.deepcopy(cfg))
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands") for c in full[key]]
    installs = [c for c in commands if "pip install" in c]
    assert installs and all("-c constraints.txt" in c for c in installs), installs
    assert any("-e ." in c for c in installs), "the setup commands must install the project"


def test_launcher_yaml_keeps_the_dashboard_local_and_auth_on():
    cfg = load("ray-cluster.yaml")
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for command in (c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in command, command
    assert "~/.ray/auth_token" in cfg["file_mounts"], "every node needs the cluster's token"
    assert all(key not in (CLUSTER / "ray-cluster.yaml").read_text() for key in SECRET_ENV)


def test_launcher_images_run_the_tested_ray_version():
    docker = load("ray-cluster.yaml")["docker"]
    for image in (docker["head_image"], docker["worker_image"]):
        assert image.startswith(f"rayproject/ray:{RAY_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"), image


# --- KubeRay ----------------------------------------------------------------------------------------------
# No KubeRay schema package exists here, so these check by hand the fields its CRDs require (RayCluster:
# spec.headGroupSpec.template with containers that have a name and an image; each worker group: groupName and a
# template; RayJob: spec.entrypoint) plus what this project needs of them.


def pod_containers(group: dict) -> list[dict]:
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def check_cluster_spec(spec: dict) -> int:
    """Checks a RayCluster spec; -> the most GPUs its worker groups can provide."""
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    for container in pod_containers(head):
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"]
        per_pod = 0
        for container in pod_containers(group):
            resources = container["resources"]
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
            per_pod += int(resources["limits"]["nvidia.com/gpu"])
        assert per_pod >= 1, f"worker group {group['groupName']} has no GPU"
        gpus += per_pod * group["maxReplicas"]
    for group in [head, *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod.get("serviceAccountName"), "S3 access comes from the service account's cloud role"
        for container in pod["containers"]:
            assert not any(e["name"] in SECRET_ENV and "value" in e for e in container.get("env", [])), container
    return gpus


def test_kuberay_raycluster():
    doc = load("kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster") and doc["metadata"]["name"]
    assert check_cluster_spec(doc["spec"]) >= 1


def test_kuberay_rayjob_runs_ray_job_py_on_its_cluster(monkeypatch):
    from spatialnet_dist.train import launch

    doc = load("kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob") and doc["metadata"]["name"]
    spec = doc["spec"]
    gpus = check_cluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == load("kuberay-raycluster.yaml")["spec"], "the two cluster specs drifted apart"
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]

    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "ray_job.py", "--config", "configs/paper.yaml"]
    monkeypatch.chdir(REPO)
    cfg = launch.load_config(launch.parse_args(argv[2:]))  # the overrides are valid keys and values
    assert cfg.train.use_gpu and 1 <= cfg.train.num_workers <= gpus
    assert cfg.data.root.startswith("s3://") and cfg.run.storage.startswith("s3://"), "nodes share no local disk"


# --- a real job on a real local head ----------------------------------------------------------------------


@pytest.mark.slow
def test_ray_job_submit_to_a_token_protected_local_head(shared_ray, tmp_path):
    """The session's shared head is one that cluster/start-local-head.sh started (conftest.RayHead)."""
    import psutil

    head = shared_ray
    address = head.dashboard
    client_env = {**head.env, "RAY_AUTH_MODE": "token"}
    # Token auth is on (the script sets RAY_AUTH_MODE=token), and the Jobs API listens on loopback only.
    assert http_status(f"{address}/api/jobs/") == 401
    listeners = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == head.dashboard_port}
    assert listeners == {"127.0.0.1"}, listeners

    run = tmp_path / "work"
    flags = [f"data.root={run}/shards", f"run.storage={run}/runs", "train.max_steps=2", "train.checkpoint_every=2",
             "train.log_every=1", "eval.at_end=false", "data.synth_images=30", "model.image_size=32",
             "train.num_workers=1"]
    job_id = f"spatialnet-test-{secrets.token_hex(4)}"
    # Job-level env_vars, as a user passes AWS_ENDPOINT_URL for MinIO: launch.py must merge with them.
    submit = subprocess.run(
        [str(RAY_BIN), "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
         "--", "python", "ray_job.py", *[a for f in flags for a in ("--set", f)]],
        env=client_env, capture_output=True, text=True, timeout=420)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]

    logs = subprocess.run([str(RAY_BIN), "job", "logs", "--address", address, job_id],
                          env=client_env, capture_output=True, text=True, timeout=60, check=True).stdout
    last = logs.strip().splitlines()[-1]
    assert last.startswith("RESULT "), logs[-4000:]
    result = json.loads(last[len("RESULT "):])
    assert result["final_step"] == 2 and result["error"] is None, result
    assert Path(result["checkpoint"]).is_dir()
    # The upload honoured .gitignore: the virtual environment stayed behind.
    packages = list(head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*"))
    assert packages and not any((p / ".venv").exists() for p in packages)


# --- the default local instance (python ray_job.py without RAY_ADDRESS) -------------------------------------


@pytest.mark.slow
def test_the_default_local_ray_instance_has_token_auth_on_loopback(monkeypatch):
    """launch.connect_ray's own instance: token auth on even when RAY_AUTH_MODE=disabled is inherited, every
    port it opens on loopback (the dashboard with the Jobs and state APIs too), the generated token private."""
    import psutil
    import ray

    from spatialnet_dist import config as config_mod
    from spatialnet_dist import ray_cluster
    from spatialnet_dist.train import launch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert launch.connect_ray(config_mod.load(None, ["train.num_workers=1"]))
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        dashboard = "http://" + ray._private.worker.global_worker.node.webui_url
        token = ray_cluster.DEFAULT_RAY_TOKEN.read_text().strip()
        assert http_status(f"{dashboard}/api/jobs/") == 401
        assert http_status(f"{dashboard}/api/jobs/", token) == 200
        # Every port of every process Ray started here (GCS, raylet, workers, agents, metrics): loopback.
        started = {p.pid for p in psutil.Process().children(recursive=True)}
        listeners = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in started}
        assert ("127.0.0.1", int(dashboard.rpartition(":")[2])) in listeners
        assert {ip for ip, _ in listeners} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listeners
        assert ray_cluster.DEFAULT_RAY_TOKEN.stat().st_mode & 0o077 == 0
    finally:
        ray.shutdown()
