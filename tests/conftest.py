"""Shared fixtures: an offline, CPU-only environment, moto's S3 server on 127.0.0.1, and Ray heads on this
machine (`shared_ray`: one cluster for the tests that can share it)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import harness
import pytest
from harness import FlakyProxy

REPO = Path(__file__).resolve().parents[1]

# Set before anything imports timm, deepspeed or ray.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The test machine's 2 cores are shared with Ray workers and servers: more threads than free
    cores makes small ops crawl (caption generation 20-50x slower with 2)."""
    import torch

    torch.set_num_threads(1)


class SmallDisk:
    """Real small filesystems for full-disk tests: `mount(size)` a tmpfs of `size` (mount's syntax: "1m") under
    the test's tmp_path, unmounted after the test; `fill(d, leave)` writes a ballast file until `leave` bytes
    are free. Skips, naming why, where this process may not mount one (tests run as root, or in `unshare -rm`)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path, self.mounted = tmp_path, []

    def mount(self, size: str, name: str = "disk") -> Path:
        d = self.tmp_path / name
        d.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"a full disk needs a small tmpfs, and none can be mounted here: {done.stderr.strip()}")
        self.mounted.append(d)
        return d

    def fill(self, d: Path, leave: int = 0) -> Path:
        ballast = d / f"ballast-{uuid.uuid4().hex[:6]}"
        chunk = b"\0" * 2**20
        with contextlib.suppress(OSError), open(ballast, "wb") as f:
            # Most of it at once (tmpfs allocates without writing): a run filling its disk as it trains must not
            # outpace the ballast. Then writes, for what the allocation's rounding left.
            if (room := shutil.disk_usage(d).free - leave) > 0:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(f.fileno(), 0, room)
                f.seek(0, os.SEEK_END)
            while (room := shutil.disk_usage(d).free - leave) > 0:
                f.write(chunk[:room])
                f.flush()
        return ballast

    def unmount_all(self) -> None:
        for d in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disks = SmallDisk(tmp_path)
    yield disks
    disks.unmount_all()


@pytest.fixture(scope="session")
def free_ports():
    """The function `free_ports(n) -> [port, ...]`, for servers and process groups a test starts."""
    return harness.free_ports


@contextlib.contextmanager
def _environment(**variables: str):
    """os.environ with `variables` set inside the block, as it was after it."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def process_group_of_one(free_ports):
    """torch.distributed (gloo) initialised in this process as a world of one, once per session: DeepSpeed keeps
    handles to the group it first saw, so a group destroyed and made anew fails its next engine."""
    import torch.distributed as dist

    from spatialnet_dist import engine as ds

    with _environment(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_ports(1)[0])):
        ds.init_distributed(False)
        yield
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server over real HTTP on 127.0.0.1; the standard AWS variables point at it."""
    from moto.server import ThreadedMotoServer

    (port,) = harness.free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with _environment(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1"):
        yield endpoint
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def flaky_s3(s3_endpoint, monkeypatch):
    """A FlakyProxy in front of moto's server; the AWS variables point at the proxy, botocore's own
    retries are off (AWS_MAX_ATTEMPTS=1) so that storage's retries are what is tested."""
    proxy = FlakyProxy(int(s3_endpoint.rpartition(":")[2]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    yield proxy
    if proxy.listening():
        proxy.down()


# --- Ray heads ------------------------------------------------------------------------------------------

RAY_BIN = Path(sys.executable).parent / "ray"


class RayHead:
    """A Ray head started by cluster/start-local-head.sh --block (token auth on, dashboard on 127.0.0.1), every
    port chosen free beforehand: other Ray instances may run on this machine at the same time."""

    def __init__(self, ports: list[int], *flags: str, env: dict[str, str] | None = None):
        # A short temp dir: Ray's unix sockets live under it and their paths are limited to 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="snray-", dir="/tmp"))
        self.token_file = self.temp_dir / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = ports
        self.address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        self.dashboard_port = dashboard
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        self.env.update(PATH=f"{RAY_BIN.parent}:{self.env['PATH']}", RAY_AUTH_TOKEN_PATH=str(self.token_file),
                        RAY_PORT=str(gcs), RAY_DASHBOARD_PORT=str(dashboard), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                        **(env or {}))
        self.log = self.temp_dir / "head.log"
        self.process = subprocess.Popen(
            ["bash", str(REPO / "cluster" / "start-local-head.sh"), "--block", f"--temp-dir={self.temp_dir}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
             f"--object-manager-port={object_manager}", "--min-worker-port=0", "--max-worker-port=0", *flags],
            env=self.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    PORTS = 9  # how many free ports the constructor takes

    def wait_until_up(self, timeout_s: float = 180) -> None:
        """Until the Jobs API answers with the token; skips the test when Ray itself cannot start here (a bad
        flag of ours or a later crash fails it)."""
        deadline = time.time() + timeout_s
        while http_status(f"{self.dashboard}/api/jobs/", self.token_file.read_text()) != 200:
            if self.process.poll() is not None:
                log = self.log.read_text()
                assert "No such option" not in log and "Ray runtime started" not in log, log
                pytest.skip(f"`ray start --head` cannot run here: {log.strip().splitlines()[-1:]}")
            assert time.time() < deadline, self.log.read_text()
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM (`ray start --block` stops every process it started), then SIGKILL to whatever of this head
        is left: its process group, and anything running in or naming its temp dir (job drivers and Ray
        workers run with cwd in the uploaded working dir)."""
        import psutil

        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
            cmdline, cwd = " ".join(proc.info["cmdline"] or []), proc.info["cwd"] or ""
            if proc.pid != os.getpid() and (str(self.temp_dir) in cmdline or cwd.startswith(str(self.temp_dir))):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def http_status(url: str, token: str | None = None) -> int:
    """The HTTP status of a GET (0: no answer), with the token as a bearer when given."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


# The files that take a minute or more, longest first; then those of half a minute and those of 7 s or more in
# `make test-fast` (its longest, test_trainer.py, handed out last left one process 14 s alone). Per-file sums of
# `--durations=0`, 2026-12-08.
LONGEST_FILES = ("test_chaos.py", "test_elastic.py", "test_reshard.py", "test_cluster.py", "test_train.py",
                 "test_resume_data.py", "test_infer.py", "test_checkpoint.py", "test_jobs.py",
                 "test_byo_corpora.py", "test_readme.py", "test_observe.py",
                 "test_trainer.py", "test_model.py", "test_s3_outage.py", "test_synthetic.py")


def pytest_collection_modifyitems(items):
    """LONGEST_FILES first, in that order, then the other files in file order; in each file the tests of
    `shared_ray` last. `make test` runs two pytest-xdist processes (--dist loadfile --no-loadscope-reorder): each
    file's tests in one of them, handed out in this order to whichever is free, so that neither is left with a
    file of minutes at the end while the other idles (xdist's own order, most tests first, put the chaos test
    last). Each process that meets a shared_ray test starts a head, which stays up to the end of the session."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), "shared_ray" in getattr(item, "fixturenames", ())))


SHARED_RAY_CPUS = 4  # logical CPUs of the shared head: room for 3 training workers of 1 CPU (2 -> 3 resharding)


@pytest.fixture(scope="session")
def _shared_ray_head(s3_endpoint):
    """The head behind `shared_ray`, started on first use and stopped at the end of the session. Started
    after moto's AWS variables are set: Ray workers take the credentials from their node's environment."""
    head = RayHead(harness.free_ports(RayHead.PORTS), f"--num-cpus={SHARED_RAY_CPUS}", "--node-ip-address=127.0.0.1",
                   env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_niceness": "0",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    try:
        head.wait_until_up()
        yield head
    finally:
        head.stop()



@pytest.fixture
def shared_ray(_shared_ray_head, monkeypatch):
    """One Ray cluster for the session, joined instead of started: RAY_ADDRESS and the token for this test, so
    that ray_cluster.connect_ray (training through launch.main, `eval run --workers`, conversion's --ray) joins
    it, and its ray.shutdown() disconnects without stopping it. Starting a local instance costs 15-50 s on the
    loaded 2-core test machine; joining costs 1-3 s.

    The head: cluster/start-local-head.sh (token auth, dashboard on 127.0.0.1) with its node on 127.0.0.1,
    SHARED_RAY_CPUS logical CPUs, the worktree on PYTHONPATH, moto's AWS credentials in its environment.
    Environment variables a test sets reach Ray workers only through ray_cluster.WORKER_ENV (the job's
    runtime env), not through the node's environment as they do for a local instance started in the test:
    a test that needs another variable in its workers (e.g. AWS_MAX_ATTEMPTS), another number of CPUs or nodes,
    or that kills Ray's own processes (raylet, GCS), starts its own (RayHead, or a local instance without this
    fixture). Yields the RayHead (address, dashboard, token_file, temp_dir, env; its Ray workers are descendants
    of head.process: kill those, not every Ray process on the machine, which other test runs share)."""
    from ray._private import ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state

    # The head's node is 127.0.0.1: without this a driver resolves 127.0.0.1 in RAY_ADDRESS to the host's
    # routable address, where the GCS does not listen (read when ray is first imported, and on the module).
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_ADDRESS", _shared_ray_head.address)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(_shared_ray_head.token_file))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")  # connect_ray sets it when joining; undone after
    reset_auth_token_state()  # this process may hold another instance's token (read once, then cached)
    yield _shared_ray_head
    import ray

    assert not ray.is_initialized(), "the test left its driver connected to the shared Ray cluster"
    monkeypatch.undo()
    reset_auth_token_state()  # the token of whatever instance a later test starts or joins
