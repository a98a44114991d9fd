"""What does the full stack cost? Bare PyTorch loops against Ray Train + DeepSpeed + shard streams.
(DESIGN.md, CONTRACT: benchmarks)

The same SpatialNet-ViT (all four heads), the same multi-task batch size and the same torch threads, at each
of --image-sizes (a faster model step makes a fixed per-step cost weigh more). A ladder of four rungs:
  bare         one process: the model, torch AdamW and gradient clipping on ONE fixed multi-task batch built
               once from the synthetic shards by the real data code, no data loading (overhead_loops.py)
  bare_ddp     the same under torch DDP (gloo) in --workers processes: adds the gradient all-reduce
  engine       the Trainer's micro-step (DeepSpeed engine at --zero-stage) on the fixed batch, in this
               process (a world of one): adds DeepSpeed's step and bookkeeping
  system       `spatialnet_dist.jobs.train_with_ray`: a local Ray instance, --workers Ray Train workers
               (cpus_per_worker = torch_threads = --threads), the DeepSpeed engine, batches streamed from the
               shards by the training loader; read from the run's metrics.jsonl, the --warmup steps left out:
               adds the loader hand-off, the step loop's bookkeeping, Ray Train's reporting, Ray's processes
Per image size (`speeds`; the top-level keys repeat the preset's own size, 128 for tiny, or the first):
  *_samples_per_s        images (rows) per second of whole steps, all workers
  ratio, ratio_ddp       system / (workers x bare), system / bare_ddp (target, issue 15: >= 0.95 for both)
  step_ms                milliseconds per step of each rung
  fixed_overhead_ms      system step - bare step, and its parts: `deepspeed` (engine - bare) and `stack`
                         (system - engine: loader hand-off, bookkeeping, reporting, Ray; with --workers > 1 also
                         the all-reduce); `all_reduce_ddp` = bare_ddp - bare. With a bare step of B ms on
                         another machine the ratio is about B / (B + fixed_overhead_ms) where the overhead holds
ratio_per_run, ratio_ddp_per_run, fixed_overhead_ms_per_run: each system run against the mean of the
                         segments of each rung on either side of it; *_spread: [min, max] of those
This 2-core machine's speed drifts by +-10% over a minute (other tenants of the host), so the bench runs
--repeats system runs, each between two segments of every in-process rung (about --segment-s seconds each),
and pools each side: drift hits both alike. Nothing is asserted.

Where the time goes, in cores (CPU seconds per wall second) over the system runs' timed steps:
  bare_cores             the bare loop's process (1.0 = --threads 1 got a whole core)
  system_cores           the system run's processes, from the report that ends the warm-up to the last but one:
                         train_worker (the Ray Train workers' training processes), loader (their DataLoader
                         workers), ray (every other process this bench started: GCS, raylet, Ray Train's
                         controller actors, dashboard, log monitor, this driver)
  ray_cores              the `ray` share by process (gcs_server, raylet, dashboard.py, Ray Train's actors...)
  cpu_ms_per_row         CPU milliseconds per row: the in-process rungs (bare_ddp: all ranks), and the system
                         run's train_worker / loader / ray
  cpu_ratio, cpu_ratio_ddp, cpu_ratio_engine: a rung's CPU per row / train_worker's: the ratios as CPU time
                         gives them, which holds where other jobs share the cores and wall time does not
On a machine with cores to spare the loader and Ray run beside the training process; where they are
short (or other jobs share them) their CPU comes out of the training process's share.

    python bench/overhead.py [--preset tiny] [--image-sizes 64,128,256] [--batch 8] [--threads 1]
                             [--workers 1] [--zero-stage 2] [--segment-s 5] [--warmup 5] [--repeats 3] [--json]
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
from overhead_loops import BareDDP, BareLoop, EngineLoop, fixed_batch  # noqa: E402, F401 (gpu_check.sh imports fixed_batch)

from spatialnet_dist import config  # noqa: E402
from spatialnet_dist.corpora.synthetic import write_synthetic  # noqa: E402
from spatialnet_dist.data.transforms import model_image_size  # noqa: E402
from spatialnet_dist.data.vocab import build_vocabs  # noqa: E402
from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS  # noqa: E402
from spatialnet_dist.train.rundir import RunDir  # noqa: E402

DEMO = REPO / "configs" / "demo.yaml"
RUN_NAME = "overhead"
RUNGS = ("bare", "bare_ddp", "engine")  # the in-process rungs, in the order each round runs them


def overrides(a: argparse.Namespace, tmp: str, image_size: int, steps: int) -> list[str]:
    """The `--set` list of the system run (`steps` timed steps after a.warmup); the bare loops read the same config."""
    total = a.warmup + steps
    return [
        f"data.root={tmp}/shards",
        "data.loader_workers=1",
        f"run.storage={tmp}/runs",
        f"run.name={RUN_NAME}",
        f"model.preset={a.preset}",
        f"model.image_size={image_size}",
        *[f"tasks.{t}.batch_size={a.batch}" for t in TASKS],
        f"train.num_workers={a.workers}",
        f"train.cpus_per_worker={a.threads}",
        f"train.torch_threads={a.threads}",
        f"train.zero_stage={a.zero_stage}",
        f"train.max_steps={total}",
        f"train.log_every={a.log_every}",
        f"train.checkpoint_every={total}",  # one checkpoint, after the last timed step
        "train.max_failures=0",
        "eval.every=0",
        "eval.at_end=false",
    ]


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


def system_run(a: argparse.Namespace, tmp: str, sets: list[str], name: str, steps: int) -> dict:
    """One run of the full stack -> rows, seconds and steps of its timed steps, and CPU seconds per role,
    wall seconds and rows of its CpuWatch window."""
    from spatialnet_dist import jobs

    argv = ["--config", str(DEMO)] if DEMO.is_file() else []
    for s in [*sets, f"run.name={name}"]:
        argv += ["--set", s]
    run_dir = str(Path(tmp) / "runs" / name)
    watch = CpuWatch(run_dir, a.warmup, a.warmup + steps - a.log_every)
    watch.start()
    with stdout_to_stderr():
        code = jobs.train_with_ray(argv)
    watch.done.set()
    if code != 0:
        raise SystemExit(f"overhead: the system run failed (exit {code}); its log is above")
    rows, seconds, timed = metrics_rate(run_dir, a.warmup)
    cpu = watch.cpu_seconds()
    return {"rows": rows, "seconds": seconds, "steps": timed, "cpu": cpu, "window_s": watch.window_s if cpu else 0.0,
            "window_rows": metrics_rate(run_dir, watch.first, watch.last)[0] if cpu else 0.0}


def segment_steps(a: argparse.Namespace, bare: BareLoop) -> int:
    """Timed steps per segment and system run: about --segment-s seconds of the bare loop, a multiple of
    --log-every, at least two reports."""
    _, seconds, _ = bare.run(warmup=1, steps=2)
    return max(2 * a.log_every, round(a.segment_s / (seconds / 2) / a.log_every) * a.log_every)


def measure(a: argparse.Namespace, tmp: str, image_size: int) -> dict:
    """Every rung at one image size: a round of the in-process rungs, then per repeat a system run and
    another round."""
    cfg = config.load(DEMO if DEMO.is_file() else None, overrides(a, tmp, image_size, 2 * a.log_every))
    vocabs = build_vocabs(cfg)
    batch = fixed_batch(cfg, vocabs)
    bare = BareLoop(cfg, vocabs, batch)
    steps = segment_steps(a, bare)
    sets = overrides(a, tmp, image_size, steps)
    cfg = config.load(DEMO if DEMO.is_file() else None, sets)
    loops = {"bare": bare, "bare_ddp": BareDDP(cfg, vocabs, batch, a.workers, a.threads),
             "engine": EngineLoop(cfg, vocabs, batch)}
    try:
        rounds = [{rung: loops[rung].run(warmup=2, steps=steps) for rung in RUNGS}]
        runs = []
        for i in range(a.repeats):
            runs.append(system_run(a, tmp, sets, f"{RUN_NAME}-{image_size}-{i}", steps))
            rounds.append({rung: loops[rung].run(warmup=1, steps=steps) for rung in RUNGS})
    finally:
        loops["bare_ddp"].close()
    return summarize(a, cfg, steps, rounds, runs)


def spread(values: list[float]) -> list[float]:
    return [min(values), max(values)]


def summarize(a: argparse.Namespace, cfg: config.Config, steps: int, rounds: list[dict], runs: list[dict]) -> dict:
    """One image size's JSON object (see the module docstring)."""
    def rate(segments) -> float:
        return sum(rows for rows, _, _ in segments) / sum(seconds for _, seconds, _ in segments)

    def step_ms(segments) -> float:
        return 1e3 * sum(seconds for _, seconds, _ in segments) / (steps * len(segments))

    rates = {rung: rate([r[rung] for r in rounds]) for rung in RUNGS}
    ms = {rung: step_ms([r[rung] for r in rounds]) for rung in RUNGS}
    rates["system"] = sum(r["rows"] for r in runs) / sum(r["seconds"] for r in runs)
    ms["system"] = 1e3 * sum(r["seconds"] for r in runs) / sum(r["steps"] for r in runs)
    per_run = []  # each system run against the mean of each rung's segments on either side of it
    for run, before, after in zip(runs, rounds, rounds[1:]):
        around = {rung: (rate([before[rung]]) + rate([after[rung]])) / 2 for rung in RUNGS}
        around_ms = {rung: (step_ms([before[rung]]) + step_ms([after[rung]])) / 2 for rung in RUNGS}
        run_rate, run_ms = run["rows"] / run["seconds"], 1e3 * run["seconds"] / run["steps"]
        per_run.append((run_rate / (a.workers * around["bare"]), run_rate / around["bare_ddp"], run_ms - around_ms["bare"]))
    ratio_per_run, ratio_ddp_per_run, overhead_per_run = ([round(x, nd) for x in xs]
                                                           for xs, nd in zip(zip(*per_run), (3, 3, 1)))

    _, bare_s, bare_cpu = (sum(x) for x in zip(*[r["bare"] for r in rounds]))
    rung_cpu_ms_per_row = {rung: 1e3 * sum(cpu for _, _, cpu in segments) / sum(rows for rows, _, _ in segments)
                           for rung, segments in ((rung, [r[rung] for r in rounds]) for rung in RUNGS)}
    window_s, window_rows = sum(r["window_s"] for r in runs), sum(r["window_rows"] for r in runs)
    role_cpu, ray_cpu = dict.fromkeys(("train_worker", "loader", "ray"), 0.0), {}
    for role, label, cpu in (process for r in runs for process in r["cpu"]):
        role_cpu[role] += cpu
        if role == "ray":
            ray_cpu[label] = ray_cpu.get(label, 0.0) + cpu
    return {
        "image_size": model_image_size(cfg.model),
        "bare_samples_per_s": round(rates["bare"], 2),
        "bare_ddp_samples_per_s": round(rates["bare_ddp"], 2),
        "engine_samples_per_s": round(rates["engine"], 2),
        "system_samples_per_s": round(rates["system"], 2),
        "ratio": round(rates["system"] / (a.workers * rates["bare"]), 3),
        "ratio_ddp": round(rates["system"] / rates["bare_ddp"], 3),
        "ratio_per_run": ratio_per_run,
        "ratio_spread": spread(ratio_per_run),
        "ratio_ddp_per_run": ratio_ddp_per_run,
        "ratio_ddp_spread": spread(ratio_ddp_per_run),
        "step_ms": {rung: round(v, 1) for rung, v in ms.items()},
        "fixed_overhead_ms": {"total": round(ms["system"] - ms["bare"], 1),
                              "deepspeed": round(ms["engine"] - ms["bare"], 1),
                              "stack": round(ms["system"] - ms["engine"], 1),
                              "all_reduce_ddp": round(ms["bare_ddp"] - ms["bare"], 1)},
        "fixed_overhead_ms_per_run": overhead_per_run,
        "fixed_overhead_ms_spread": spread(overhead_per_run),
        "bare_segments_samples_per_s": [round(rate([r["bare"]]), 2) for r in rounds],
        "bare_cores": round(bare_cpu / bare_s, 3),
        "system_cores": {role: round(cpu / window_s, 3) for role, cpu in role_cpu.items()} if window_s else None,
        "ray_cores": {label: round(cpu / window_s, 3) for label, cpu in sorted(ray_cpu.items(), key=lambda kv: -kv[1])
                      if cpu / window_s >= 0.002} if window_s else None,
        "cpu_ms_per_row": {rung: round(v, 2) for rung, v in rung_cpu_ms_per_row.items()}
        | ({role: round(1e3 * cpu / window_rows, 2) for role, cpu in role_cpu.items()} if window_rows else {}),
        # CPU time holds where wall time does not (other jobs on the cores): the training processes' CPU per row
        # against each bare loop's (the loader's and Ray's processes are beside it, in cpu_ms_per_row)
        **({f"cpu_ratio{suffix}": round(rung_cpu_ms_per_row[rung] / (1e3 * role_cpu["train_worker"] / window_rows), 3)
            for suffix, rung in (("", "bare"), ("_ddp", "bare_ddp"), ("_engine", "engine"))} if window_rows else {}),
        "steps": {"segment": steps, "system_warmup": a.warmup, "repeats": a.repeats},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-sizes", default="64,128,256", help="comma-separated; 0: the preset's (tiny: 128)")
    p.add_argument("--batch", type=int, default=8, help="rows per task per step and worker (the demo's 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, and each Ray worker's CPUs (the demo's 1)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers, and bare DDP processes")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--segment-s", type=float, default=5.0,
                   help="seconds of bare loop per segment; sets the timed steps of every segment and system run")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps of each system run")
    p.add_argument("--log-every", type=int, default=5, help="system run's report interval; divides --warmup")
    p.add_argument("--repeats", type=int, default=3, help="system runs per image size, each between two rounds")
    p.add_argument("--images", type=int, default=160, help="synthetic corpus size (80%% train)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    a = p.parse_args(argv)
    if a.warmup % a.log_every:
        p.error("--log-every must divide --warmup")
    sizes = [int(x) for x in a.image_sizes.split(",")]

    torch.set_num_threads(a.threads)
    # Linux groups CPU time by session (sched_autogroup): Ray's processes start sessions of their own, so
    # under other jobs' load they would get a group's share while the bare loops shared this shell's. A
    # session of our own puts the bare loops on the same footing.
    with contextlib.suppress(PermissionError):  # already a session leader
        os.setsid()
    with tempfile.TemporaryDirectory(prefix="spatialnet-overhead-") as tmp, stdout_to_stderr():
        write_synthetic(f"{tmp}/shards", images=a.images, seed=0, shard_size=max(1, a.images // 8))
        speeds = [measure(a, tmp, size) for size in sizes]
        cfg = config.load(DEMO if DEMO.is_file() else None, overrides(a, tmp, 0, a.log_every))

    preset_size = model_image_size(cfg.model)
    headline = next((s for s in speeds if s["image_size"] == preset_size), speeds[0])
    result = {
        **{k: v for k, v in headline.items() if k != "steps"},
        "ratio_min": min(s["ratio"] for s in speeds),
        "ratio_ddp_min": min(s["ratio_ddp"] for s in speeds),
        "speeds": speeds,
        "preset": a.preset,
        "batch_per_task": a.batch,
        "tasks": len(cfg.tasks.enabled()),
        "threads": a.threads,
        "workers": a.workers,
        "zero_stage": a.zero_stage,
        "steps": {"system_warmup": a.warmup, "repeats": a.repeats, "segment": {s["image_size"]: s["steps"]["segment"]
                                                                               for s in speeds}},
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    if a.json:
        print(json.dumps(result))
    else:
        for s in speeds:
            print(f"{s['image_size']} px: step ms {s['step_ms']}  overhead ms {s['fixed_overhead_ms']}  "
                  f"ratio {s['ratio']} {s['ratio_spread']}  ratio_ddp {s['ratio_ddp']} {s['ratio_ddp_spread']}")
        for key, value in result.items():
            if key != "speeds":
                print(f"{key:28s} {value}")
        print(f"system / bare_ddp >= {result['ratio_ddp_min']} at every size (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
