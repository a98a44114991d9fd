"""Per-rank memory of ZeRO stages 0-3: the bytes of parameters, gradients and optimizer state that a
DeepSpeed engine really holds. (DESIGN.md, CONTRACT: benchmarks)

For each stage, `--world-size` processes (gloo, CPU) build the engine with
`spatialnet_dist.engine.create_engine` for SpatialNet-ViT with all four heads (vocabulary sizes of
a representative run), and run two training steps on a tiny multi-task batch. Right after the second
backward, before its optimizer step, every piece of persistent training state exists at once (the Adam
moments from the first step, this step's gradients): rank 0 then walks the engine's tensors and adds up
their storages, each storage once:
  params     the module's parameters: the full tensors, and under ZeRO-3 each one's partition
             (`ds_tensor`) plus the small parameters ZeRO-3 keeps whole on every rank (persistent)
  grads      `.grad` of the parameters and of the fp32 master partitions, and ZeRO's gradient
             partitions (`averaged_gradients`, `grad_partitions_flat_buffer`, ...)
  optimizer  the torch optimizer's state (Adam exp_avg, exp_avg_sq, step) and ZeRO's master weight
             partitions (`single_partition_of_fp32_groups`, `fp32_partitioned_groups_flat`) where they are
             copies rather than the parameters themselves
  buckets    communication buffers the engine keeps between steps (ZeRO-3's reduce bucket, `ipg_buckets`)
  other      any other tensor reachable from the engine's optimizer
`stageN` = params + grads + optimizer + buckets + other, in bytes. `process_tensors` is every live tensor
storage in rank 0's process at that moment (a check that the walk missed nothing large).
`expected` is the ZeRO paper's model (Rajbhandari et al. 2020) for N parameters and W ranks: params P,
gradients G, optimizer state O (fp32: P=4N, G=4N, O=8N; bf16: P=2N, G=2N, O=12N with the fp32 master);
stage 0 P+G+O, stage 1 P+G+O/W, stage 2 P+(G+O)/W, stage 3 (P+G+O)/W. Target (issue 4): stage3 <= 0.55 x stage0.

    python bench/zero_memory.py [--preset tiny] [--world-size 2] [--precision fp32] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # DeepSpeed's JIT op, built once

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

STAGES = (0, 1, 2, 3)
CATEGORIES = ("params", "grads", "optimizer", "buckets", "other")
# How a tensor found under the engine's optimizer is counted: the first rule whose text is in its
# attribute path wins (paths look like `opt.optimizer.state[...][exp_avg]`, `opt.averaged_gradients[0]`).
OPTIMIZER_RULES = (
    (".grad", "grads"),
    ("gradients", "grads"),
    ("grad_partition", "grads"),
    ("grads_in_partition", "grads"),
    ("ipg", "buckets"),
    ("bucket", "buckets"),
    (".state", "optimizer"),
    ("fp32", "optimizer"),
    ("param_groups", "optimizer"),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StorageTally:
    """Bytes per category, each tensor storage counted once (views of one flat buffer are one buffer)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = dict.fromkeys(CATEGORIES, 0)

    def add(self, tensor, category: str) -> None:
        if not torch.is_tensor(tensor):
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes[category] += storage.nbytes()

    def add_module(self, module: torch.nn.Module) -> None:
        for p in module.parameters():
            self.add(p.data, "params")  # ZeRO-3: empty once partitioned, unless persistent
            self.add(getattr(p, "ds_tensor", None), "params")  # ZeRO-3: this rank's partition
        for p in module.parameters():
            self.add(p.grad, "grads")

    def add_optimizer(self, optimizer) -> None:
        """Every tensor reachable from the (ZeRO) optimizer's attributes, lists and dicts."""
        stack, visited = [("opt", optimizer)], set()
        while stack:
            path, obj = stack.pop()
            if id(obj) in visited:
                continue
            visited.add(id(obj))
            if torch.is_tensor(obj):
                category = next((c for text, c in OPTIMIZER_RULES if text in path), "other")
                self.add(obj, category)
                if obj.grad is not None:
                    stack.append((f"{path}.grad", obj.grad))
            elif isinstance(obj, dict):
                stack += [(f"{path}[{k if isinstance(k, (str, int)) else '*'}]", v) for k, v in obj.items()]
            elif isinstance(obj, (list, tuple)):
                stack += [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
            elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
                stack += [(f"{path}.{k}", v) for k, v in vars(obj).items()]


def process_tensor_bytes() -> int:
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_rank(rank: int, world_size: int, port: int, stage: int, preset: str, precision: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.stdout = sys.stderr  # DeepSpeed prints its op builds to stdout; the bench's stdout is one JSON object
    torch.set_num_threads(1)
    from model_step import multitask_batch  # bench/model_step.py: the multi-task batch of the step benches

    from spatialnet_dist import engine as ds
    from spatialnet_dist.config import Config
    from spatialnet_dist.model.spatialnet import assemble_model
    from spatialnet_dist.model.summary import REPRESENTATIVE_SIZES
    from spatialnet_dist.objective import MultiTaskObjective
    from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS

    cfg = Config()
    cfg.model.preset, cfg.train.zero_stage, cfg.train.precision = preset, stage, precision
    for task in TASKS:
        getattr(cfg.tasks, task).batch_size = 1
    ds.init_distributed(use_gpu=False)
    torch.manual_seed(0)
    model = assemble_model(cfg.model, list(TASKS), REPRESENTATIVE_SIZES)
    n_params = sum(p.numel() for p in model.parameters())
    engine = ds.create_engine(cfg, model, world_size)
    dtype = torch.bfloat16 if ds.precision(cfg) == "bf16" else torch.float32
    size = model.image_size
    batch = multitask_batch(torch.randn(len(TASKS), cfg.model.in_chans, size, size, dtype=dtype), cfg.model)
    objective = MultiTaskObjective(cfg.loss)
    for step in range(2):
        loss = objective(engine(batch), batch, engine.module)["loss"]
        engine.backward(loss)
        del loss
        if step == 1 and rank == 0:
            tally = StorageTally()
            tally.add_module(engine.module)
            tally.add_optimizer(engine.optimizer)
            record = {**tally.bytes, "total": sum(tally.bytes.values()), "process_tensors": process_tensor_bytes(),
                      "n_params": n_params, "optimizer_class": type(engine.optimizer).__name__}
            Path(out).write_text(json.dumps(record))
        engine.step()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def expected_bytes(n_params: int, world_size: int, precision: str) -> dict[str, int]:
    """The ZeRO paper's bytes per rank: parameters, gradients and Adam state (bf16: with the fp32 master)."""
    if precision == "fp32":
        params, grads, optim = 4 * n_params, 4 * n_params, 8 * n_params
    else:
        params, grads, optim = 2 * n_params, 2 * n_params, 12 * n_params
    w = world_size
    return {"stage0": params + grads + optim, "stage1": params + grads + optim // w,
            "stage2": params + (grads + optim) // w, "stage3": (params + grads + optim) // w}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, paper, ...)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    a = p.parse_args(argv)
    breakdown = {}
    with tempfile.TemporaryDirectory(prefix="spatialnet-zero-") as tmp:
        for stage in STAGES:
            out = os.path.join(tmp, f"stage{stage}.json")
            mp.spawn(measure_rank, args=(a.world_size, free_port(), stage, a.preset, a.precision, out),
                     nprocs=a.world_size, join=True)
            breakdown[f"stage{stage}"] = json.loads(Path(out).read_text())
            if not a.json:
                print(f"stage {stage}: {breakdown[f'stage{stage}']}", file=sys.stderr)
    n_params = breakdown["stage0"]["n_params"]
    result = {f"stage{s}": breakdown[f"stage{s}"]["total"] for s in STAGES}
    result |= {
        "ratio_stage3_stage0": round(result["stage3"] / result["stage0"], 3),
        "expected": expected_bytes(n_params, a.world_size, a.precision),
        "breakdown": {k: {c: v[c] for c in (*CATEGORIES, "process_tensors", "optimizer_class")}
                      for k, v in breakdown.items()},
        "preset": a.preset,
        "world_size": a.world_size,
        "precision": a.precision,
        "n_params": n_params,
    }
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"preset {a.preset}, {n_params:,} parameters, {a.world_size} ranks, {a.precision}; MiB per rank (rank 0)")
    print(f"{'':8}{'params':>10}{'grads':>10}{'optim':>10}{'buckets':>10}{'other':>10}{'total':>10}{'expected':>10}")
    for s in STAGES:
        b = result["breakdown"][f"stage{s}"]
        cells = [b[c] for c in CATEGORIES] + [result[f"stage{s}"], result["expected"][f"stage{s}"]]
        print(f"stage {s} " + "".join(f"{v / 2**20:10.1f}" for v in cells))
    print(f"stage3 / stage0 = {result['ratio_stage3_stage0']} (target <= 0.55)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
