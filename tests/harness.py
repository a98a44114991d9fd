"""What the tests and bench/chaos.py share to run jobs against real parts on this machine: free ports, a TCP proxy
in front of moto's S3 server for outages, a Ray cluster of two `ray start` nodes on 127.0.0.1, `ray_job.py` as a
job's driver in a process of its own, and the tiny settings those jobs train with. Nothing here imports pytest."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


TINY = [
    "model.image_size=32",
    "train.log_every=1",
    "train.max_failures=2",
    "eval.every=0",
    "eval.at_end=false",
    "data.loader_workers=1",
    "tasks.captioning.batch_size=4",
    "tasks.vqa.batch_size=4",
    "tasks.classification.batch_size=4",
    "tasks.regression.batch_size=4",
    "tasks.tagging.batch_size=4",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def result_line(out: str) -> dict:
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    return json.loads(last[len("RESULT "):])


def free_ports(n: int) -> list[int]:
    """n distinct ports on 127.0.0.1 that nothing listens on now (bound together, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# What a test's rank processes import, once, into this process's fork server: a spawned process imports torch,
# DeepSpeed, timm and this package anew, ~8 s of CPU each on the 2-core test machine (22 of them in `make test`).
RANK_PRELOAD = ["torch", "deepspeed", "timm", "spatialnet_dist.engine", "spatialnet_dist.train.trainer",
                "spatialnet_dist.evaluate.run", "spatialnet_dist.store.writer"]


def spawn_ranks(fn, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn(fn, args, nprocs): fn(rank, *args) in nprocs processes, the first exception
    ends the others and is raised here. The processes are forked from the fork server of this process (started
    at the first call, with RANK_PRELOAD imported; where store/pool.py started it first, with its own), each
    with this process's environment and working directory of now, not the server's of its start."""
    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(RANK_PRELOAD)  # read when the server starts, not after
    mp.start_processes(_rank_in_context, args=(fn, dict(os.environ), os.getcwd(), args), nprocs=nprocs,
                       start_method="forkserver")


def _rank_in_context(rank: int, fn, environ: dict[str, str], cwd: str, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    fn(rank, *args)


def as_torchrun_worker(rank: int, world_size: int, port: int) -> None:
    """What torchrun gives a process it starts, for a test's rank (`spawn_ranks`): the process group's variables
    (gloo on 127.0.0.1, DeepSpeed on the CPU), and fork as the way it starts processes of its own (its data
    loaders), whatever start method this process inherited: under "spawn" each loader process would import torch
    and this package again, 10-20 s each on the test machine."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    multiprocessing.set_start_method("fork", force=True)


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of another port, for outages the test controls: `down()` closes the
    listening socket and resets open connections (new ones are refused) until `up()` opens it again on the
    same port, and `cut_after(n, k)`
    makes the next k connections drop after n bytes towards the client (mid-body of a GET). The server
    behind it keeps its data across the outage."""

    def __init__(self, target_port: int):
        self.target_port, self.cuts_left, self.cut_bytes, self.cuts = target_port, 0, 0, 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()  # open connections, both sides
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._serve(self._listener)

    def _serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            with self._lock:
                limit = self.cut_bytes if self.cuts_left > 0 else None
                self.cuts_left -= limit is not None
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    with self._lock:
                        self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        self._reset(src, dst)

    def _reset(self, *sockets: socket.socket) -> None:
        """Close with a reset, as a dropped connection looks to the client."""
        for s in sockets:
            with self._lock:
                self._sockets.discard(s)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)  # wakes the other pipe thread blocked in recv()
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def cut_after(self, n_bytes: int, connections: int) -> None:
        with self._lock:
            self.cut_bytes, self.cuts_left = n_bytes, connections

    def listening(self) -> bool:
        return self._listener.fileno() != -1

    def down(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread, which would hold the port
        self._listener.close()
        with self._lock:
            open_now = list(self._sockets)
        self._reset(*open_now)

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        self._serve(listener)

    def outage(self, start_s: float, seconds: float) -> threading.Thread:
        """down() `start_s` from now, up() `seconds` later, in the background."""

        def run():
            time.sleep(start_s)
            self.down()
            time.sleep(seconds)
            self.up()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


class Node:
    """`ray start ... --block` in its own session: `kill()` SIGKILLs it and every process it started (its raylet,
    agents and the raylet's workers), as when a machine is lost."""

    def __init__(self, args: list[str], env: dict, log: Path):
        ray_bin = Path(sys.executable).parent / "ray"
        self.proc = subprocess.Popen([str(ray_bin), "start", "--block", "--disable-usage-stats", *args], env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.log = log
        # every process of this node seen so far, as psutil.Process: its kill() refuses a pid that a new process took
        # since (pid_max is 32768 here, and the other pytest-xdist process starts processes too)
        self.seen: dict[int, object] = {}

    def processes(self):
        import psutil

        try:
            parent = psutil.Process(self.proc.pid)
            found = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            found = []
        self.seen.update((p.pid, p) for p in found)
        return found

    def kill(self) -> None:
        import psutil

        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """`ray start --block` stops what it started on SIGTERM; whatever is left is killed."""
        import psutil

        self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        for proc in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _node_ports(free_ports) -> list[str]:
    node_manager, object_manager, metrics, agent_http, agent_grpc, runtime_env = free_ports(6)
    return [f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
            "--min-worker-port=0", "--max-worker-port=0", "--num-cpus=1"]


class TwoNodes:
    def __init__(self, tmp: Path, free_ports):
        self.tmp, self.free_ports = tmp, free_ports
        # A short temp dir: Ray's unix sockets live under it and their paths are limited to 107 bytes.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="snel-", dir="/tmp"))
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        gcs, dashboard, client = free_ports(3)
        self.address = f"127.0.0.1:{gcs}"
        # No RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what launch sets for its own one-node instance): it refuses a
        # second node. A dead raylet is noticed after 2 failed health checks 1 s apart (Ray's default: 5 x 3 s).
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                        RAY_worker_niceness="0", RAY_health_check_period_ms="1000",
                        RAY_health_check_failure_threshold="2",
                        # A raylet whose agents start slowly on a loaded machine gives up after 30 s by default.
                        RAY_agent_register_timeout_ms="180000", RAY_raylet_start_wait_time_s="180",
                        # Ray Train waits this long for the resources of a group of the size it asked for (60 s by
                        # default), then asks again, for fewer where the group is elastic: the lost-node test
                        # spends it once. A timeout is a controller error, retried without limit.
                        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")
        self.head = Node(["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                          f"--ray-client-server-port={client}", f"--temp-dir={self.ray_tmp}",
                          *_node_ports(free_ports)], self.env, tmp / "head.log")
        self.second: Node | None = None
        self.wait_for_nodes(1)

    def add_second(self) -> None:
        if self.second is None or self.second.proc.poll() is not None:
            self.second = Node([f"--address={self.address}", *_node_ports(self.free_ports)], self.env,
                               self.tmp / f"node-{time.time():.0f}.log")
        self.wait_for_nodes(2)

    def wait_for_nodes(self, n: int, timeout_s: float = 180) -> None:
        ray_bin = Path(sys.executable).parent / "ray"
        deadline = time.time() + timeout_s
        while True:
            status = subprocess.run([str(ray_bin), "status", f"--address={self.address}"], env=self.env,
                                    capture_output=True, text=True).stdout
            if status.count(" node_") >= n and "Pending:\n (no pending nodes)" in status:
                return
            for node in (self.head, self.second):
                assert node is None or node.proc.poll() is None, node.log.read_text()[-3000:]
            assert time.time() < deadline, status
            time.sleep(2)

    def stop(self) -> None:
        for node in (self.second, self.head):
            if node is not None:
                node.stop()
        import shutil

        shutil.rmtree(self.ray_tmp, ignore_errors=True)


class Job:
    """`python ray_job.py ARGS` submitted to the cluster as its driver, in a process of its own: Ray reads the
    auth mode once per process, and this one imported Ray before the cluster existed. `pid(rank)`: the process
    of Ray Train worker `rank` in the latest worker group, from the controller's lines in the driver's log."""

    WORKER = re.compile(r"\(ip=[^,]+, pid=(\d+)\) world_rank=(\d+),")  # the controller's line per worker

    def __init__(self, cluster: TwoNodes, args: list[str]):
        env = {**cluster.env, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "ray_job.py"), *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def pid(self, rank: int) -> int | None:
        """The pid of the worker of `rank` the controller named last, while it is a Ray Train worker: None once it
        ended (its pid may be another process's by now: pid_max is 32768 here, and the other pytest-xdist process
        starts processes too)."""
        import psutil

        pids = [int(m[1]) for line in self.lines if (m := self.WORKER.search(line)) and int(m[2]) == rank]
        try:
            return pids[-1] if pids and "RayTrainWorker" in " ".join(psutil.Process(pids[-1]).cmdline()) else None
        except psutil.Error:  # ended
            return None

    def result(self, timeout_s: float = 900) -> tuple[int, dict]:
        try:
            code = self.proc.wait(timeout=timeout_s)
        finally:
            self.proc.kill()
        self.reader.join(timeout=30)
        out = "".join(self.lines)
        return code, result_line(out) if out.strip().splitlines()[-1].startswith("RESULT ") else {"log": out[-6000:]}


def when(condition, then, timeout_s: float = 600) -> threading.Thread:
    def watch():
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if condition():
                then()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
