"""What does the full stack cost? A bare PyTorch loop against Ray Train + DeepSpeed + shard streams.
(DESIGN.md, CONTRACT: benchmarks)

The same SpatialNet-ViT (all four heads), the same multi-task batch size and the same torch threads:
  bare_samples_per_s     one process: the model, torch AdamW and gradient clipping, stepping on ONE fixed
                         multi-task batch built once from the synthetic shards by the real data code
                         (so the shapes are those of training), no data loading in the loop
  system_samples_per_s   `spatialnet_dist.train.launch.main`: a local Ray instance, one Ray Train worker
                         (cpus_per_worker = torch_threads = --threads), the DeepSpeed engine at
                         --zero-stage, batches streamed from the same shards by the training loader;
                         read from the run's metrics.jsonl, reports covering the first --warmup steps left out
  ratio                  system / bare (target, issue 4: >= 0.95)
Images (rows) per second of whole training steps. This 2-core machine's speed drifts by +-10% over a
minute (other tenants of the host), so the bench runs --repeats system runs, each between two bare
segments of --steps steps, and pools each side: drift hits both alike. `ratio_per_run` compares each
system run with the mean of the bare segments on either side of it. Nothing is asserted.

Where the time goes, in cores (CPU seconds per wall second) over the timed steps:
  bare_cores             the bare loop's process (1.0 = --threads 1 got a whole core)
  system_cores           the system run's processes, from the report that ends the warm-up to the last but one:
                         train_worker (the Ray Train worker's training process), loader (its DataLoader
                         worker), ray (every other process this bench started: GCS, raylet, Ray Train's
                         controller actors, dashboard, log monitor, this driver)
  ray_cores              the `ray` share by process (gcs_server, raylet, dashboard.py, Ray Train's actors...)
  cpu_ms_per_row         CPU milliseconds per row: bare, and system train_worker / loader / ray
On a machine with cores to spare the loader and Ray run beside the training process; where they are
short (or other jobs share them) their CPU comes out of the training process's share.

    python bench/overhead.py [--preset tiny] [--image-size 0] [--batch 8] [--threads 1] [--zero-stage 2]
                             [--steps 30] [--warmup 5] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # DeepSpeed's JIT op, built once

import psutil  # noqa: E402
import torch  # noqa: E402

from spatialnet_dist import config  # noqa: E402
from spatialnet_dist.config import TASKS  # noqa: E402
from spatialnet_dist.corpora.synthetic import write_synthetic  # noqa: E402
from spatialnet_dist.data import build_vocabs, make_train_loader, model_image_size  # noqa: E402
from spatialnet_dist.model import build_model  # noqa: E402
from spatialnet_dist.objective import MultiTaskObjective  # noqa: E402
from spatialnet_dist.train.rundir import RunDir  # noqa: E402

DEMO = REPO / "configs" / "demo.yaml"
RUN_NAME = "overhead"


def overrides(a: argparse.Namespace, tmp: str) -> list[str]:
    """The `--set` list of the system run; the bare loop reads the same config."""
    steps = a.warmup + a.steps
    return [
        f"data.root={tmp}/shards",
        "data.loader_workers=1",
        f"run.storage={tmp}/runs",
        f"run.name={RUN_NAME}",
        f"model.preset={a.preset}",
        f"model.image_size={a.image_size}",
        *[f"tasks.{t}.batch_size={a.batch}" for t in TASKS],
        "train.num_workers=1",
        f"train.cpus_per_worker={a.threads}",
        f"train.torch_threads={a.threads}",
        f"train.zero_stage={a.zero_stage}",
        f"train.max_steps={steps}",
        f"train.log_every={a.log_every}",
        f"train.checkpoint_every={steps}",  # one checkpoint, after the last timed step
        "train.max_failures=0",
        "eval.every=0",
        "eval.at_end=false",
    ]


class BareLoop:
    """Model + AdamW + clipping on one fixed batch, as a person would write it without the stack."""

    def __init__(self, cfg: config.Config, vocabs, batch: dict):
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(cfg.model, cfg.tasks.enabled(), vocabs)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        self.objective = MultiTaskObjective(cfg.loss)
        self.batch, self.clip = batch, cfg.optim.grad_clip
        self.rows = sum(len(sub["image_id"]) for sub in batch.values())

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.objective(self.model(self.batch), self.batch, self.model)["loss"].backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()

    def run(self, warmup: int, steps: int) -> tuple[int, float, float]:
        """-> (rows, seconds, CPU seconds of this process) of `steps` timed steps after `warmup` untimed ones."""
        for _ in range(warmup):
            self.step()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        return self.rows * steps, time.perf_counter() - start, time.process_time() - cpu


def fixed_batch(cfg: config.Config, vocabs) -> dict:
    """One training batch from the shards through the real loader (in this process), without its stats."""
    cfg = config.from_dict(cfg.to_dict())
    cfg.data.loader_workers = 0
    loader = make_train_loader(cfg, vocabs, rank=0, world_size=1)
    batch = next(loader)
    loader.close()
    batch.pop("stats")
    return batch


@contextlib.contextmanager
def stdout_to_stderr():
    """Ray's and the launcher's prints go to stderr, so that --json leaves one object on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cpu_by_process() -> dict[int, tuple[str, str, float]]:
    """pid -> (role, label, CPU seconds so far) of this process and every process it started, Ray's
    included. label: the process name, or for a Python process its script (dashboard.py, log_monitor.py)."""
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            with proc.oneshot():
                name, cmdline, times = proc.name(), proc.cmdline(), proc.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        role = "loader" if name == "pt_data_worker" else "train_worker" if "RayTrainWorker" in " ".join(cmdline) else "ray"
        script = next((Path(arg).name for arg in cmdline if arg.endswith(".py")), name)
        out[proc.pid] = (role, script if name.startswith("python") else name, times.user + times.system)
    return out


class CpuWatch(threading.Thread):
    """CPU seconds per process between two reports of the system run: snapshots taken when metrics.jsonl
    first shows step `first` and then step `last` (not the run's final report: the loader has stopped by
    the time that one is seen). Processes present at both snapshots count."""

    def __init__(self, run_dir: str, first: int, last: int):
        super().__init__(daemon=True)
        self.rundir, self.first, self.last = RunDir(run_dir), first, last
        self.start_snap = self.end_snap = None
        self.window_s = 0.0
        self.done = threading.Event()

    def _steps(self) -> set[int]:
        try:
            return {m["step"] for m in self.rundir.metrics() if "step_time_s" in m}
        except Exception:  # not written yet
            return set()

    def run(self) -> None:
        while not self.done.wait(0.2):
            steps = self._steps()
            if self.start_snap is None and self.first in steps:
                self.start_snap, t0 = cpu_by_process(), time.monotonic()
            if self.start_snap is not None and self.last in steps:
                self.end_snap, self.window_s = cpu_by_process(), time.monotonic() - t0
                return

    def cpu_seconds(self) -> list[tuple[str, str, float]]:
        """(role, label, CPU seconds in the window) per process; empty when the window was not seen."""
        if self.end_snap is None:
            return []
        return [(role, label, end - self.start_snap[pid][2])
                for pid, (role, label, end) in self.end_snap.items() if pid in self.start_snap]


def metrics_rate(run_dir: str, warmup: int, until: int | None = None) -> tuple[float, float, int]:
    """-> (rows, seconds, steps) of a run's training reports after its first `warmup` steps (up to step
    `until`), from the run's metrics.jsonl (each report covers the steps since the previous one).
    Also used by gpu_check.sh."""
    rows = seconds = 0.0
    last_step, timed = 0, 0
    for record in RunDir(run_dir).metrics():
        if "step_time_s" not in record:  # not a training report (evaluation results)
            continue
        steps = record["step"] - last_step
        last_step = record["step"]
        if record["step"] <= warmup or (until is not None and record["step"] > until):
            continue
        elapsed = record["step_time_s"] * steps
        rows += record["samples_per_s"] * elapsed
        seconds += elapsed
        timed += steps
    return rows, seconds, timed


def system_run(a: argparse.Namespace, tmp: str, sets: list[str], name: str) -> dict:
    """One run of the full stack -> rows and seconds of its timed steps, and CPU seconds per role, wall
    seconds and rows of its CpuWatch window."""
    from spatialnet_dist.train import launch

    argv = ["--config", str(DEMO)] if DEMO.is_file() else []
    for s in [*sets, f"run.name={name}"]:
        argv += ["--set", s]
    run_dir = str(Path(tmp) / "runs" / name)
    watch = CpuWatch(run_dir, a.warmup, a.warmup + a.steps - a.log_every)
    watch.start()
    with stdout_to_stderr():
        code = launch.main(argv)
    watch.done.set()
    if code != 0:
        raise SystemExit(f"overhead: the system run failed (exit {code}); its log is above")
    rows, seconds, _ = metrics_rate(run_dir, a.warmup)
    cpu = watch.cpu_seconds()
    return {"rows": rows, "seconds": seconds, "cpu": cpu, "window_s": watch.window_s if cpu else 0.0,
            "window_rows": metrics_rate(run_dir, watch.first, watch.last)[0] if cpu else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=0, help="0: the preset's (tiny: 128, as the demo trains)")
    p.add_argument("--batch", type=int, default=8, help="rows per task per step (the demo's 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, and the Ray worker's CPUs (the demo's 1)")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--steps", type=int, default=30, help="timed steps of each system run and bare segment")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps of each system run")
    p.add_argument("--log-every", type=int, default=5, help="system run's report interval; divides --warmup")
    p.add_argument("--repeats", type=int, default=3, help="system runs, each between two bare segments")
    p.add_argument("--images", type=int, default=160, help="synthetic corpus size (80%% train)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    a = p.parse_args(argv)
    if a.warmup % a.log_every or a.steps % a.log_every or a.steps < 2 * a.log_every:
        p.error("--log-every must divide --warmup and --steps, and --steps be at least twice --log-every")

    with tempfile.TemporaryDirectory(prefix="spatialnet-overhead-") as tmp:
        write_synthetic(f"{tmp}/shards", images=a.images, seed=0, shard_size=max(1, a.images // 8))
        sets = overrides(a, tmp)
        cfg = config.load(DEMO if DEMO.is_file() else None, sets)
        vocabs = build_vocabs(cfg)
        torch.set_num_threads(a.threads)
        bare = BareLoop(cfg, vocabs, fixed_batch(cfg, vocabs))
        # Bare segments before, between and after the system runs: drifting load hits both sides alike.
        segments = [bare.run(warmup=2, steps=a.steps)]
        runs = []
        for i in range(a.repeats):
            runs.append(system_run(a, tmp, sets, f"{RUN_NAME}-{i}"))
            segments.append(bare.run(warmup=1, steps=a.steps))

    bare_rows, bare_s, bare_cpu = (sum(x) for x in zip(*segments))
    bare_rate = bare_rows / bare_s
    system_rate = sum(r["rows"] for r in runs) / sum(r["seconds"] for r in runs)
    segment_rates = [rows / seconds for rows, seconds, _ in segments]
    window_s, window_rows = sum(r["window_s"] for r in runs), sum(r["window_rows"] for r in runs)
    role_cpu, ray_cpu = dict.fromkeys(("train_worker", "loader", "ray"), 0.0), {}
    for role, label, cpu in (process for r in runs for process in r["cpu"]):
        role_cpu[role] += cpu
        if role == "ray":
            ray_cpu[label] = ray_cpu.get(label, 0.0) + cpu
    result = {
        "bare_samples_per_s": round(bare_rate, 2),
        "system_samples_per_s": round(system_rate, 2),
        "ratio": round(system_rate / bare_rate, 3),
        # each system run against the mean of the bare segments on either side of it
        "ratio_per_run": [round(r["rows"] / r["seconds"] / ((before + after) / 2), 3)
                          for r, before, after in zip(runs, segment_rates, segment_rates[1:])],
        "bare_segments_samples_per_s": [round(rate, 2) for rate in segment_rates],
        "bare_cores": round(bare_cpu / bare_s, 3),
        "system_cores": {role: round(cpu / window_s, 3) for role, cpu in role_cpu.items()} if window_s else None,
        "ray_cores": {label: round(cpu / window_s, 3) for label, cpu in sorted(ray_cpu.items(), key=lambda kv: -kv[1])
                      if cpu / window_s >= 0.002} if window_s else None,
        "cpu_ms_per_row": {"bare": round(1e3 * bare_cpu / bare_rows, 2)}
        | ({role: round(1e3 * cpu / window_rows, 2) for role, cpu in role_cpu.items()} if window_rows else {}),
        "preset": a.preset,
        "image_size": model_image_size(cfg.model),
        "batch_per_task": a.batch,
        "tasks": len(cfg.tasks.enabled()),
        "threads": a.threads,
        "zero_stage": a.zero_stage,
        "steps": {"bare_segment": a.steps, "system_run": a.steps, "system_warmup": a.warmup, "repeats": a.repeats},
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    if a.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28s} {value}")
        print(f"system / bare = {result['ratio']} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
