"""The GPU check's driver (bench/gpu_check.sh runs it once per ZeRO stage x compile setting).

In one process, for each rows-per-step setting: build the DeepSpeed engine of the real Trainer's config
(world of one), take ONE fixed multi-task batch from the shards through the real loader, put it on the
device, and step on it (objective, engine.backward, engine.step: the Trainer's micro-step, no loader and
no host sync in the loop). Per setting, one JSON line, written as soon as it exists:
  samples_per_s              rows/s of the timed steps (warm-up and compile excluded)
  train_gflops_per_row       counted: FlopCounterMode over one whole training step (forward + backward of
                             the encoder and each row's own head) on the fixed batch, / rows
  est_gflops_per_row         the old estimate: 3 x the forward GFLOPs of encoder + EVERY head
                             (spatialnet_dist.model.summary), which overstates the work
  mfu, mfu_est               samples_per_s x the counted / estimated FLOPs over the card's dense bf16 peak
  mfu_vs_matmul              the counted MFU against an 8192^3 bf16 matmul measured on the card
  compile_s                  wall time of the first compiled step (compile + one step); null when eager
With --data-rate, after the first setting: rows/s of the training loader alone (data.loader_workers
processes decoding and batching, the image cache as configured), beside that setting's model rate.

    python bench/gpu_check.py OUT.jsonl --stage 0 --compile true --rows 512 128 [--data-rate] -- --set ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import fixed_batch  # noqa: E402

from spatialnet_dist import engine as ds  # noqa: E402
from spatialnet_dist.data.batches import make_train_loader  # noqa: E402
from spatialnet_dist.data.transforms import model_image_size  # noqa: E402
from spatialnet_dist.data.vocab import build_vocabs  # noqa: E402
from spatialnet_dist.model.spatialnet import build_model  # noqa: E402
from spatialnet_dist.model.summary import model_summary  # noqa: E402
from spatialnet_dist.objective import MultiTaskObjective  # noqa: E402
from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS  # noqa: E402
from spatialnet_dist.train.launch import load_config, parse_args  # noqa: E402
from spatialnet_dist.train.trainer import peak_memory_mb, to_device  # noqa: E402

DENSE_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def emit(out: Path, record: dict) -> None:
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print("GPU_CHECK " + json.dumps(record), flush=True)


def measure(cfg, vocabs, device, compile_model: bool, warmup: int, steps: int) -> dict:
    """One engine on one fixed batch -> rate, counted FLOPs per row, compile time, peak memory."""
    cfg.train.compile = "false"  # compiled below, after the FLOP count (which needs the eager step)
    torch.manual_seed(cfg.run.seed)
    engine = ds.create_engine(cfg, build_model(cfg.model, cfg.tasks.enabled(), vocabs), 1)
    dtype = torch.bfloat16 if ds.precision(cfg) == "bf16" else torch.float32
    objective = MultiTaskObjective(cfg.loss)
    batch = to_device(fixed_batch(cfg, vocabs), device, dtype)
    rows = sum(len(sub["image_id"]) for sub in batch.values())

    def step():
        engine.backward(objective(engine(batch), batch, engine.module)["loss"])
        engine.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    compile_s = None
    if compile_model:
        ds.compile_engine(engine)
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    result = {"rows_per_step": rows, "samples_per_s": rows * steps / seconds, "step_ms": 1e3 * seconds / steps,
              "train_gflops_per_row": flops / rows / 1e9, "compile_s": compile_s,
              "peak_memory_mb": peak_memory_mb(device)}
    return result


def release(device: torch.device) -> None:
    """Free the last setting's engine before the next one is built."""
    gc.collect()
    torch._dynamo.reset()  # the next setting compiles for its own static shapes
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def data_rate(cfg, vocabs, batches: int) -> float:
    """Rows/s of the training loader alone. Its start-up and the batches its workers prefetched meanwhile
    (loader_workers x prefetch, which come at once: the first GPU run timed 1.3M rows/s on them) excluded."""
    loader = make_train_loader(cfg, vocabs, rank=0, world_size=1)
    try:
        for _ in range(1 + max(1, cfg.data.loader_workers) * cfg.data.prefetch):
            next(loader)
        t0 = time.perf_counter()
        rows = sum(len(sub["image_id"]) for _ in range(batches)
                   for task, sub in next(loader).items() if task in TASKS)
        return rows / (time.perf_counter() - t0)
    finally:
        loader.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--compile", choices=("true", "false"), required=True)
    p.add_argument("--rows", type=int, nargs="+", required=True, help="rows per step, split evenly over the tasks")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data-rate", action="store_true")
    p.add_argument("--data-batches", type=int, default=10)
    a, config_args = p.parse_known_args()
    # A world of one, as `python -m spatialnet_dist.jobs` makes it.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    base = parse_args([arg for arg in config_args if arg != "--"])
    cfg0 = load_config(base)
    device = torch.device("cuda", 0) if cfg0.train.use_gpu else torch.device("cpu")
    card, peak, ceiling = "cpu", None, None
    if device.type == "cuda":
        torch.cuda.set_device(0)
        card = torch.cuda.get_device_name(0)
        peak = next((tflops for name, tflops in DENSE_BF16_TFLOPS if name in card), None)
        ceiling = matmul_tflops()
    ds.init_distributed(cfg0.train.use_gpu)
    vocabs = build_vocabs(cfg0)
    size = model_image_size(cfg0.model)
    est_gflops = 3 * model_summary(cfg0.model.preset, size)["gflops_per_image"]
    tasks = cfg0.tasks.enabled()

    for i, rows in enumerate(a.rows):
        if rows % len(tasks):
            raise SystemExit(f"--rows {rows}: not a multiple of the {len(tasks)} enabled tasks")
        sets = [f"tasks.{t}.batch_size={rows // len(tasks)}" for t in tasks] + [f"train.zero_stage={a.stage}"]
        cfg = load_config(parse_args([arg for arg in config_args if arg != "--"] +
                                     [x for s in sets for x in ("--set", s)]))
        m = measure(cfg, vocabs, device, a.compile == "true", a.warmup, a.steps)
        release(device)

        def utilisation(gflops, tflops, rate=m["samples_per_s"]):
            return round(rate * gflops / 1e3 / tflops, 4) if tflops else None

        record = {
            "stage": a.stage, "compile": a.compile == "true", "card": card, "preset": cfg.model.preset,
            "image_size": size, "precision": ds.precision(cfg), "rows_per_step": m["rows_per_step"],
            "samples_per_s": round(m["samples_per_s"], 1), "step_ms": round(m["step_ms"], 2),
            "train_gflops_per_row": round(m["train_gflops_per_row"], 2), "est_gflops_per_row": round(est_gflops, 2),
            "mfu": utilisation(m["train_gflops_per_row"], peak), "mfu_est": utilisation(est_gflops, peak),
            "mfu_vs_matmul": utilisation(m["train_gflops_per_row"], ceiling),
            "peak_bf16_tflops": peak, "measured_matmul_tflops": round(ceiling, 1) if ceiling else None,
            "compile_s": round(m["compile_s"], 1) if m["compile_s"] is not None else None,
            "peak_memory_mb": round(m["peak_memory_mb"], 1), "timed_steps": a.steps, "warmup_steps": a.warmup,
        }
        emit(a.out, record)
        if a.data_rate and i == 0:
            rate = data_rate(cfg, vocabs, a.data_batches)
            emit(a.out, {"data_rows_per_s": round(rate, 1), "model_rows_per_s": record["samples_per_s"],
                         "data_over_model": round(rate / record["samples_per_s"], 2),
                         "rows_per_step": m["rows_per_step"], "loader_workers": cfg.data.loader_workers,
                         "image_cache_mb": cfg.data.image_cache_mb, "stage": a.stage, "compile": record["compile"]})


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (loader workers, process groups): the results are written
