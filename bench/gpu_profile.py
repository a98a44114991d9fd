"""Where a GPU training step's time goes (issue 15): forward+objective, backward and optimizer step timed
apart (synchronised), a torch.profiler table of the busiest ops, and kernel launches per step, for the
`paper` preset on one fixed batch, per train.precision: DeepSpeed's bf16 optimizer (`bf16`: bf16 weights, fp32
master copies) against DeepSpeed's torch_autocast (`bf16-autocast`: fp32 weights, bf16 matmuls under autocast).

    python bench/gpu_profile.py --rows 128 512 -- --config configs/demo.yaml --set model.preset=paper ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import release, sync  # noqa: E402
from overhead import fixed_batch  # noqa: E402

from spatialnet_dist import engine as ds  # noqa: E402
from spatialnet_dist.data.vocab import build_vocabs  # noqa: E402
from spatialnet_dist.model.spatialnet import build_model  # noqa: E402
from spatialnet_dist.objective import MultiTaskObjective  # noqa: E402
from spatialnet_dist.train.launch import load_config, parse_args  # noqa: E402
from spatialnet_dist.train.trainer import to_device  # noqa: E402


def profile_setting(cfg, vocabs, device, steps: int) -> None:
    torch.manual_seed(0)
    engine = ds.create_engine(cfg, build_model(cfg.model, cfg.tasks.enabled(), vocabs), 1)
    objective = MultiTaskObjective(cfg.loss)
    dtype = torch.bfloat16 if ds.precision(cfg) == "bf16" else torch.float32
    batch = to_device(fixed_batch(cfg, vocabs), device, dtype)
    rows = sum(len(sub["image_id"]) for sub in batch.values())
    phases = {"forward": 0.0, "backward": 0.0, "step": 0.0}

    def step(timed: bool):
        marks = [time.perf_counter()]
        loss = objective(engine(batch), batch, engine.module)["loss"]
        if timed:
            sync(device)
            marks.append(time.perf_counter())
        engine.backward(loss)
        if timed:
            sync(device)
            marks.append(time.perf_counter())
        engine.step()
        if timed:
            sync(device)
            marks.append(time.perf_counter())
            for name, a, b in zip(phases, marks, marks[1:]):
                phases[name] += b - a

    for _ in range(3):
        step(False)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(False)
    sync(device)
    step_ms = 1e3 * (time.perf_counter() - t0) / steps
    for _ in range(steps):
        step(True)
    split = {k: round(1e3 * v / steps, 1) for k, v in phases.items()}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(False)
        sync(device)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) / 2
    cuda_ms = sum(e.self_device_time_total for e in events) / 1e3 / 2
    print(f"PROFILE precision={ds.precision(cfg)} rows={rows} step_ms={step_ms:.1f} split_ms={split} "
          f"kernel_launches_per_step={launches:.0f} gpu_busy_ms_per_step={cuda_ms:.1f}", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60), flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)
    release(device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[128, 512])
    p.add_argument("--precisions", nargs="+", default=["bf16", "bf16-autocast"])
    p.add_argument("--steps", type=int, default=5)
    a, config_args = p.parse_known_args()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29518")):
        os.environ.setdefault(key, value)
    config_args = [arg for arg in config_args if arg != "--"]
    cfg0 = load_config(parse_args(config_args))
    device = torch.device("cuda", 0) if cfg0.train.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    ds.init_distributed(cfg0.train.use_gpu)
    vocabs = build_vocabs(cfg0)
    tasks = cfg0.tasks.enabled()
    for rows in a.rows:
        for precision in a.precisions:
            sets = [f"tasks.{t}.batch_size={rows // len(tasks)}" for t in tasks]
            sets += ["train.compile=false", f"train.precision={precision}"]
            cfg = load_config(parse_args(config_args + [x for s in sets for x in ("--set", s)]))
            profile_setting(cfg, vocabs, device, a.steps)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
