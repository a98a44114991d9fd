"""A run under a storm of seeded faults ends with the parameters of an undisturbed run (issue 30's chaos test).

    python bench/chaos.py --faults 20 --json

The demo corpus (synthetic, tiny model) trains on two workers, one on each of two `ray start` nodes on 127.0.0.1,
ZeRO-2, shards and run storage on moto's S3 server behind a proxy that can go down (tests/harness.py). While it
trains, faults drawn from `--seed` fire one after another, each once the run has recovered from the one before and
trained a few steps more:

  sigkill_worker       SIGKILL of one worker process (a crash, the OOM killer)
  sigterm_worker       SIGTERM to one worker process (a spot reclaim; to all its processes: tests/test_elastic.py)
  s3_outage            the S3 endpoint down for 2-40 s, under data.s3_retry_seconds
  node_loss            the second node killed whole (raylet, agents, its worker), started again 2-10 s later
  damaged_checkpoint   a byte of the newest checkpoint flipped after its publish, then a worker SIGKILLed
  kill_during_upload   S3 down at a checkpoint step, a worker SIGKILLed while the checkpoint waits to upload

The same job undisturbed, in the same cluster, gives the reference. Prints one JSON object (CONTRACT:
benchmarks): faults_injected, faults_by_kind, restarts, lost_steps (per restart), params_equal (torch.equal over
every tensor of the two final checkpoints), wall_s, undisturbed_wall_s; and what tests/test_chaos.py checks the
run against: faults (each fired fault with its step, the restarts it caused and the seconds to the next step
trained), restart_causes, attempts (world size, start step, the damaged checkpoints it passed over),
failures_by_class (failures.json), final_step, one_metric_line_per_step, checkpoint_every.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from harness import TINY, FlakyProxy, Job, TwoNodes, free_ports, sets  # noqa: E402

KINDS = ("sigkill_worker", "sigterm_worker", "s3_outage", "node_loss", "damaged_checkpoint", "kill_during_upload")
CHECKPOINT_EVERY = 4
STEPS_PER_FAULT = 6  # room for one fault: the steps from a recovery to the next fault and its checkpoint
RETRY_SECONDS = 60  # data.s3_retry_seconds: above the longest outage (40 s)
WAIT_S = 600  # at most this long for any one thing the storm waits on


def draw_faults(n: int, seed: int) -> list[dict]:
    """n faults, each kind once before any twice (so that n >= 4 gives 4 kinds), in a seeded order, each with the
    steps to train after the recovery from the one before ("after") and its own seeded parameters."""
    rng = random.Random(seed)
    kinds: list[str] = []
    while len(kinds) < n:
        kinds += rng.sample(KINDS, len(KINDS))
    faults = []
    for kind in kinds[:n]:
        fault = {"kind": kind, "after": rng.randint(1, 3), "rank": rng.randint(0, 1)}
        if kind == "s3_outage":
            fault["seconds"] = round(rng.uniform(2, 40), 1)
        if kind == "node_loss":
            fault["down_s"] = round(rng.uniform(2, 10), 1)
        if kind == "kill_during_upload":
            fault["down_s"] = round(rng.uniform(3, 8), 1)
        faults.append(fault)
    return faults


class StormError(RuntimeError):
    """The storm could not go on; the message ends with the tail of the job's log."""


def wait_for(condition, what: str, job: Job, timeout_s: float = WAIT_S):
    """condition()'s first true value; a StormError when the job ends first or `timeout_s` passes."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if job.proc.poll() is not None:
            raise StormError(f"chaos: the job ended (exit {job.proc.returncode}) while the storm waited for {what}\n"
                             + "".join(job.lines[-80:]))
        time.sleep(0.2)
    raise StormError(f"chaos: gave up after {timeout_s:.0f} s waiting for {what}\n" + "".join(job.lines[-80:]))


class Storm:
    """The faults of one run, fired from the bench's process: it reads the run directory straight from moto (the
    job's own traffic goes through the proxy)."""

    def __init__(self, cluster: TwoNodes, proxy: FlakyProxy, job: Job, run_url: str, bucket: str, moto):
        from spatialnet_dist.train.rundir import RunDir

        self.cluster, self.proxy, self.job, self.run = cluster, proxy, job, RunDir(run_url)
        self.bucket, self.prefix, self.moto = bucket, run_url.split("/", 3)[3], moto
        self.fired: list[dict] = []

    # ---- what the run has done ----

    def step(self) -> int:
        metrics = self.run.metrics()
        return metrics[-1]["step"] if metrics else 0

    def attempts(self) -> int:
        return len(self.run.attempts())

    def trained_past_start(self, attempts_before: int) -> bool:
        """A new attempt (beyond `attempts_before`) has trained a step past its start."""
        attempts = self.run.attempts()
        return len(attempts) > attempts_before and self.step() > attempts[-1]["start_step"]

    def checkpoint_objects(self, step: int) -> list[str]:
        from spatialnet_dist.checkpoint import checkpoint_name

        listing = self.moto.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/{checkpoint_name(step)}/")
        return [o["Key"] for o in listing.get("Contents", [])]

    def next_checkpoint_step(self) -> int:
        return (self.step() // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY

    # ---- faults ----

    def worker_pid(self, rank: int) -> int:
        return wait_for(lambda: self.job.pid(rank), f"the pid of worker {rank}", self.job)

    def sigkill(self, rank: int) -> None:
        os.kill(self.worker_pid(rank), signal.SIGKILL)

    def fire(self, fault: dict, max_steps: int) -> bool:
        """Fires `fault` once the run has trained fault["after"] steps past now, then waits until it recovered.
        -> False when the run is too close to its end for it."""
        target = self.step() + fault["after"]
        if fault["kind"] == "kill_during_upload":  # the step before a checkpoint's
            target = -(-(target + 1) // CHECKPOINT_EVERY) * CHECKPOINT_EVERY - 1
        if target >= max_steps - 2:
            return False
        wait_for(lambda: self.step() >= target, f"step {target} before {fault['kind']}", self.job)
        attempts_before, at = self.attempts(), {"step": self.step(), "time": time.time()}
        getattr(self, fault["kind"])(fault, at)
        if fault["kind"] == "s3_outage":
            wait_for(lambda: self.step() > at["step"], f"a step after the outage at step {at['step']}", self.job)
        else:
            wait_for(lambda: self.trained_past_start(attempts_before), f"a restart after {fault['kind']}", self.job)
        self.fired.append({**fault, **at, "restarts": self.attempts() - attempts_before,
                           "recovered_s": round(time.time() - at["time"], 1)})  # to a step trained after it
        return True

    def sigkill_worker(self, fault: dict, at: dict) -> None:
        self.sigkill(fault["rank"])

    def sigterm_worker(self, fault: dict, at: dict) -> None:
        os.kill(self.worker_pid(fault["rank"]), signal.SIGTERM)

    def s3_outage(self, fault: dict, at: dict) -> None:
        self.proxy.outage(0, fault["seconds"]).join()

    def node_loss(self, fault: dict, at: dict) -> None:
        self.cluster.second.kill()
        time.sleep(fault["down_s"])
        self.cluster.add_second()

    def damaged_checkpoint(self, fault: dict, at: dict) -> None:
        """Once the next checkpoint is complete: one byte of its largest file flipped in place (the object
        rewritten), then a worker killed so that the restart meets the damage."""
        from spatialnet_dist.checkpoint import MANIFEST

        step = self.next_checkpoint_step()
        wait_for(lambda: any(k.endswith(f"/{MANIFEST}") for k in self.checkpoint_objects(step)),
                 f"checkpoint {step}", self.job)
        listing = self.moto.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/checkpoint-")["Contents"]
        key = max((o for o in listing if f"-{step:06d}/" in o["Key"] and not o["Key"].endswith(".json")),
                  key=lambda o: o["Size"])["Key"]
        body = bytearray(self.moto.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        body[len(body) // 2] ^= 0xFF
        self.moto.put_object(Bucket=self.bucket, Key=key, Body=bytes(body))
        self.sigkill(fault["rank"])
        at.update(checkpoint_step=step, damaged=key.rsplit(f"-{step:06d}/", 1)[1])

    def kill_during_upload(self, fault: dict, at: dict) -> None:
        """S3 down once the step before a checkpoint is reported: the checkpoint step's metric line and its
        checkpoint files wait on the endpoint; a worker is killed while they wait, and S3 returns after it."""
        from spatialnet_dist.checkpoint import MANIFEST

        step = self.next_checkpoint_step()
        self.proxy.down()
        try:
            time.sleep(fault["down_s"] / 2)
            self.sigkill(fault["rank"])
            time.sleep(fault["down_s"] / 2)
        finally:
            self.proxy.up()
        at.update(checkpoint_step=step,
                  published=any(k.endswith(f"/{MANIFEST}") for k in self.checkpoint_objects(step)))


def storm(faults: int, seed: int, work: Path, steps_per_fault: int = STEPS_PER_FAULT) -> dict:
    """Runs the undisturbed job and the job under `faults` seeded faults on one cluster, each run
    8 + steps_per_fault * faults steps long; -> the JSON summary."""
    import boto3
    import torch
    from moto.server import ThreadedMotoServer

    from spatialnet_dist import checkpoint as ckpt
    from spatialnet_dist.checkpoint_weights import consolidated_weights
    from spatialnet_dist.corpora.synthetic import write_synthetic
    from spatialnet_dist.train.rundir import FAILURE_CLASSES, RunDir

    (port,) = free_ports(1)
    moto_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto_server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    proxy = FlakyProxy(port)
    bucket = "chaos"
    moto = boto3.client("s3", endpoint_url=endpoint)
    moto.create_bucket(Bucket=bucket)
    # The cluster's processes reach S3 through the proxy, with botocore's own retries off: storage's retries
    # through an outage are what is under test. This process reads around the proxy.
    os.environ.update(AWS_ENDPOINT_URL=proxy.url, AWS_MAX_ATTEMPTS="1")
    cluster = TwoNodes(work, free_ports)
    os.environ.update(AWS_ENDPOINT_URL=endpoint)
    os.environ.pop("AWS_MAX_ATTEMPTS")
    try:
        data, runs = f"s3://{bucket}/shards", f"s3://{bucket}/runs"
        write_synthetic(data, images=40, seed=0, shard_size=10)
        cluster.add_second()
        drawn = draw_faults(faults, seed)
        max_steps = 8 + steps_per_fault * faults
        args = [*TINY, f"data.root={data}", f"run.storage={runs}", "train.num_workers=2", "train.zero_stage=2",
                f"train.max_steps={max_steps}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                "run.keep_checkpoints=3", f"train.max_failures={3 * faults + 2}",
                f"data.s3_retry_seconds={RETRY_SECONDS}"]
        t0 = time.time()
        code, undisturbed = Job(cluster, sets(*args, "run.name=undisturbed")).result(timeout_s=3600)
        undisturbed_wall_s = time.time() - t0
        if code != 0:
            raise RuntimeError(f"chaos: the undisturbed run failed: {undisturbed}")

        t0 = time.time()
        job = Job(cluster, sets(*args, "run.name=storm"))
        chaos = Storm(cluster, proxy, job, f"{runs}/storm", bucket, moto)
        try:
            for fault in drawn:
                if not chaos.fire(fault, max_steps):
                    break
        except StormError as e:
            raise StormError(f"{e}\nfired so far: {json.dumps(chaos.fired)}") from None
        code, result = job.result(timeout_s=3600)
        wall_s = time.time() - t0
        if code != 0:
            raise RuntimeError(f"chaos: the run under faults failed: {result}")

        with ckpt.local_copy(result["checkpoint"]) as d:
            disturbed_weights = consolidated_weights(d)
        with ckpt.local_copy(undisturbed["checkpoint"]) as d:
            reference = consolidated_weights(d)
        params_equal = (disturbed_weights.keys() == reference.keys()
                        and all(torch.equal(disturbed_weights[k], reference[k]) for k in reference))
        run = RunDir(result["run_dir"])
        attempts = run.attempts()
        return {
            "faults_injected": len(chaos.fired),
            "faults_by_kind": dict(Counter(f["kind"] for f in chaos.fired)),
            "restarts": result["restarts"],
            "lost_steps": result["lost_steps"],
            "params_equal": params_equal,
            "wall_s": round(wall_s, 1),
            "undisturbed_wall_s": round(undisturbed_wall_s, 1),
            "faults": chaos.fired,
            "restart_causes": result["restart_causes"],
            "attempts": [{k: a.get(k) for k in ("start_step", "world_size", "cause", "lost_steps", "damaged")}
                         for a in attempts],
            "failures_by_class": {kind: len(run.failures(kind)) for kind in FAILURE_CLASSES},
            "final_step": result["final_step"],
            "one_metric_line_per_step": [m["step"] for m in run.metrics()] == list(range(1, max_steps + 1)),
            "max_steps": max_steps,
            "checkpoint_every": CHECKPOINT_EVERY,
        }
    finally:
        cluster.stop()
        proxy.down()
        moto_server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=20, help="how many faults to fire (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the faults' kinds, steps and lengths")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    with tempfile.TemporaryDirectory(prefix="chaos-") as work:
        summary = storm(args.faults, args.seed, Path(work))
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=1))
    return 0 if summary["params_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
