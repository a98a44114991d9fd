"""Shared fixtures: an offline, CPU-only environment and moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest

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


def _free_ports(n: int) -> list[int]:
    """n distinct ports on 127.0.0.1 that nothing listens on now (bound together, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def free_ports():
    """The function `free_ports(n) -> [port, ...]`, for servers and process groups a test starts."""
    return _free_ports


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server over real HTTP on 127.0.0.1; the standard AWS variables point at it."""
    from moto.server import ThreadedMotoServer

    (port,) = _free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


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
