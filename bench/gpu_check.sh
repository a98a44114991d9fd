#!/usr/bin/env bash
# The GPU check (issue 4), one prepared run for a lent single-GPU machine (H100 or H200), no Ray:
# SpatialNet-ViT `paper` preset with all four heads, bf16, the real Trainer through
# spatialnet_dist.train.local (one process, NCCL world of one), batches streamed from the synthetic
# corpus generated on the machine at 256 px, DeepSpeed ZeRO-0 then ZeRO-3. Per stage, one JSON line:
#   samples_per_s             rows/s of whole training steps, data loading included, from metrics.jsonl,
#                             the reports covering the first WARMUP steps left out
#   model_only_samples_per_s  the same engine stepping on one fixed batch already on the GPU (no loader,
#                             no host sync in the loop): what the model alone can do
#   mfu, model_only_mfu       achieved FLOP/s over the card's dense bf16 peak (datasheet: H100 SXM and
#                             H200 989 TFLOP/s; H100 PCIe 756); *_vs_matmul over an 8192^3 bf16 matmul
#                             measured on the card in the same process
#   train_gflops_per_sample   3 x the forward GFLOPs per image of spatialnet_dist.model.summary.model_summary
#                             (encoder + every head, representative vocabularies; forward + backward = 3x
#                             forward). Each row runs the encoder and ONE head, so this slightly overstates
#                             the work: the MFU figures are an upper estimate.
#   peak_memory_mb            torch.cuda.max_memory_allocated, from the run's metrics.jsonl
# The lines go to stdout and $OUT/gpu_check.json, logs to $OUT/*.log when $OUT is set.
#
#   bash bench/gpu_wheels.sh                                  here, once: the wheels the device lacks -> .whl/
#   device run (carry .whl):  bash bench/gpu_check.sh         about 4 minutes
#   CPU dry run of the same logic:  PYTHON=.venv/bin/python bash bench/gpu_check.sh --cpu
# Settings can be changed through the environment: STEPS, WARMUP, BATCH, LOADERS, IMAGES, STAGES, PRESET,
# PRECISION (the --cpu run takes PRECISION=bf16 too).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; fi
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check-out-XXXX)}
WORK=$(mktemp -d /tmp/gpu-check-XXXX)  # corpus, runs and checkpoints: gone at exit, the results are in $OUT
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
START=$SECONDS

if [ "$MODE" = gpu ]; then
  : "${PRESET:=paper}" "${IMAGES:=320}" "${BATCH:=32}" "${WARMUP:=20}" "${STEPS:=60}" "${LOG_EVERY:=20}"
  : "${LOADERS:=12}" "${MODEL_STEPS:=30}" "${STAGES:=0 3}" "${PRECISION:=bf16}"
  USE_GPU=true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/card.txt"
  # The image has torch and timm but no DeepSpeed or WebDataset: install what bench/gpu_wheels.sh fetched.
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
else
  : "${PRESET:=tiny}" "${IMAGES:=40}" "${BATCH:=2}" "${WARMUP:=1}" "${STEPS:=2}" "${LOG_EVERY:=1}"
  : "${LOADERS:=1}" "${MODEL_STEPS:=2}" "${STAGES:=0 3}" "${PRECISION:=fp32}"
  USE_GPU=false
  export PYTHONPATH=$PWD
fi
"$PY" -c "import torch, deepspeed, timm, webdataset; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__,
'timm', timm.__version__, 'webdataset', webdataset.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1

"$PY" -m spatialnet_dist.cli shards synth "$WORK/shards" --images "$IMAGES" 2>&1 | tee "$OUT/synth.log"
echo "corpus ready after $((SECONDS - START)) s"

# The driver: the stack's own training entry (local.train) for the system rate, then the same engine on a
# fixed batch for the model-only rate. One process per stage, so each stage starts with a clean GPU.
cat > "$WORK/driver.py" <<'PYEOF'
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from overhead import fixed_batch, metrics_rate  # noqa: E402

from spatialnet_dist.data import build_vocabs, model_image_size  # noqa: E402
from spatialnet_dist.model.summary import model_summary  # noqa: E402
from spatialnet_dist.train import engine as ds  # noqa: E402
from spatialnet_dist.train import local  # noqa: E402
from spatialnet_dist.train.launch import load_config, parse_args  # noqa: E402
from spatialnet_dist.train.rundir import RunDir  # noqa: E402
from spatialnet_dist.train.trainer import to_device  # noqa: E402

DENSE_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))


def matmul_tflops(n=8192, reps=10):
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


def model_only_rate(trainer, cfg, vocabs, warmup, steps):
    """Rows/s of engine forward/backward/step on one fixed batch already on the device."""
    batch = fixed_batch(cfg, vocabs)
    rows = sum(len(sub["image_id"]) for sub in batch.values())
    batch = to_device(batch, trainer.device, trainer.dtype)
    engine = trainer.engine

    def step():
        loss = trainer.objective(engine(batch), batch, engine.module)["loss"]
        engine.backward(loss)
        engine.step()

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return rows * steps / (time.perf_counter() - t0)


def main():
    out_json, warmup, model_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # A world of one, as `python -m spatialnet_dist.train.local` makes it.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    cfg = load_config(parse_args(sys.argv[4:]))
    card, peak, ceiling = "cpu", None, None
    if cfg.train.use_gpu:
        torch.cuda.set_device(0)
        card = torch.cuda.get_device_name(0)
        peak = next((tflops for name, tflops in DENSE_BF16_TFLOPS if name in card), None)
        ceiling = matmul_tflops()
    ds.init_distributed(cfg.train.use_gpu)
    vocabs = build_vocabs(cfg)
    run_dir = Path(cfg.run.storage) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = local.train(cfg, vocabs, run_dir, rank=0, world_size=1)
    train_wall = time.perf_counter() - t0
    rows, seconds, steps = metrics_rate(str(run_dir), warmup)
    metrics = [m for m in RunDir(str(run_dir)).metrics() if "peak_memory_mb" in m]
    rate = rows / seconds
    model_rate = model_only_rate(trainer, cfg, vocabs, warmup=3, steps=model_steps)
    size = model_image_size(cfg.model)
    gflops = 3 * model_summary(cfg.model.preset, size)["gflops_per_image"]

    def utilisation(samples_per_s, tflops):
        return round(samples_per_s * gflops / 1e3 / tflops, 4) if tflops else None

    result = {
        "stage": cfg.train.zero_stage, "card": card, "preset": cfg.model.preset, "image_size": size,
        "precision": ds.precision(cfg), "batch_per_task": cfg.tasks.vqa.batch_size,
        "rows_per_step": ds.micro_batch_size(cfg), "loader_workers": cfg.data.loader_workers,
        "samples_per_s": round(rate, 1), "model_only_samples_per_s": round(model_rate, 1),
        "train_gflops_per_sample": round(gflops, 2), "peak_bf16_tflops": peak,
        "measured_matmul_tflops": round(ceiling, 1) if ceiling else None,
        "mfu": utilisation(rate, peak), "model_only_mfu": utilisation(model_rate, peak),
        "mfu_vs_matmul": utilisation(rate, ceiling), "model_only_mfu_vs_matmul": utilisation(model_rate, ceiling),
        "peak_memory_mb": round(max(m["peak_memory_mb"] for m in metrics), 1),
        "timed_steps": steps, "warmup_steps": warmup, "train_wall_s": round(train_wall, 1),
    }
    Path(out_json).write_text(json.dumps(result))
    print("GPU_CHECK " + json.dumps(result), flush=True)


main()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown (loader workers, process groups): the results are written
PYEOF

: > "$OUT/gpu_check.json"
for stage in $STAGES; do
  t=$SECONDS
  timeout 200 "$PY" "$WORK/driver.py" "$WORK/zero$stage.json" "$WARMUP" "$MODEL_STEPS" \
    --config configs/demo.yaml \
    --set "data.root=$WORK/shards" --set "data.loader_workers=$LOADERS" \
    --set "run.storage=$WORK/runs" --set "run.name=zero$stage" \
    --set "model.preset=$PRESET" --set model.image_size=0 \
    --set tasks.captioning.batch_size="$BATCH" --set tasks.vqa.batch_size="$BATCH" \
    --set tasks.classification.batch_size="$BATCH" --set tasks.regression.batch_size="$BATCH" \
    --set "train.use_gpu=$USE_GPU" --set "train.precision=$PRECISION" --set "train.zero_stage=$stage" \
    --set train.num_workers=1 --set "train.max_steps=$((WARMUP + STEPS))" --set "train.log_every=$LOG_EVERY" \
    --set "train.checkpoint_every=$((WARMUP + STEPS))" --set eval.every=0 --set eval.at_end=false \
    > "$OUT/zero$stage.log" 2>&1 || { echo "stage $stage failed (exit $?); the end of its log:"; tail -40 "$OUT/zero$stage.log"; }
  if [ -s "$WORK/zero$stage.json" ]; then
    cat "$WORK/zero$stage.json" >> "$OUT/gpu_check.json"
    echo >> "$OUT/gpu_check.json"
  fi
  echo "stage $stage: $((SECONDS - t)) s"
done
echo "total $((SECONDS - START)) s; results in $OUT/gpu_check.json"
cat "$OUT/gpu_check.json"
