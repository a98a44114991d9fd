#!/usr/bin/env bash
# The GPU check (issue 15), one prepared run for a lent single-GPU machine (H100 or H200), no Ray:
# SpatialNet-ViT `paper` preset with all four heads at 256 px, bf16, the DeepSpeed engine the Trainer
# builds (world of one, NCCL), on a fixed multi-task batch taken by the real loader from the synthetic
# corpus generated on the machine. For each CONFIGS item (ZeRO stage : train.compile), in this order
#   0:true 0:false 3:false 3:true
# and each ROWS setting (rows per step, split evenly over the four tasks: 512 then 128), one JSON line
# (bench/gpu_check.py documents the fields): samples/s, MFU from the FLOPs counted over the actual
# training step (FlopCounterMode, forward + backward) and from the old 3 x forward-of-every-head estimate,
# compile time, peak memory; after the first, the training loader's rate (LOADERS workers) against it.
# Peaks: datasheet dense bf16 (H100 SXM and H200 989 TFLOP/s; H100 PCIe 756) and an 8192^3 bf16 matmul
# measured on the card. The lines go to stdout and $OUT/gpu_check.json as they come, logs to $OUT/*.log.
# The whole run stays under DEADLINE seconds (330 on the GPU, machine start not counted): each process
# gets what is left, up to CAP.
#
#   bash bench/gpu_wheels.sh                                  here, once: the wheels the device lacks -> .whl/
#   device run (carry .whl):  bash bench/gpu_check.sh         under 6 minutes
#   CPU dry run of the same logic:  PYTHON=.venv/bin/python bash bench/gpu_check.sh --cpu
# Settings can be changed through the environment: CONFIGS, ROWS, STEPS, WARMUP, LOADERS, IMAGES, PRESET,
# PRECISION, DEADLINE, CAP.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/device_setup.sh "${1:-}" gpu-check
START=$SECONDS

if [ "$MODE" = gpu ]; then
  : "${PRESET:=paper}" "${IMAGES:=200}" "${ROWS:=512 128}" "${WARMUP:=3}" "${STEPS:=10}" "${LOADERS:=12}"
  : "${CONFIGS:=0:true 0:false 3:false 3:true}" "${PRECISION:=auto}" "${DEADLINE:=330}" "${CAP:=170}"
  USE_GPU=true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/card.txt"
  install_wheels
else
  : "${PRESET:=tiny}" "${IMAGES:=40}" "${ROWS:=8 4}" "${WARMUP:=1}" "${STEPS:=2}" "${LOADERS:=1}"
  : "${CONFIGS:=0:false 3:false 0:true}" "${PRECISION:=fp32}" "${DEADLINE:=900}" "${CAP:=600}"
  USE_GPU=false
  export PYTHONPATH=$PWD
fi
"$PY" -c "import torch, deepspeed, timm, webdataset; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__,
'timm', timm.__version__, 'webdataset', webdataset.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1

"$PY" -m spatialnet_dist.cli shards synth "$WORK/shards" --images "$IMAGES" 2>&1 | tee "$OUT/synth.log"
echo "corpus ready after $((SECONDS - START)) s"

# One process per ZeRO stage x compile setting (bench/gpu_check.py), each running every ROWS setting,
# most important first; each gets what is left of DEADLINE seconds (counted from the script's start)
# up to CAP, and writes each result line as soon as it exists, so a timeout keeps what finished.
: > "$OUT/gpu_check.json"
first=1
for config in $CONFIGS; do
  stage=${config%%:*} compile=${config##*:}
  left=$((DEADLINE - (SECONDS - START)))
  limit=$((left < CAP ? left : CAP))
  if [ "$limit" -lt 20 ]; then echo "zero$stage compile=$compile: skipped, ${left} s left"; continue; fi
  extra=()
  if [ "$first" = 1 ]; then extra=(--data-rate); first=0; fi
  t=$SECONDS
  timeout "$limit" "$PY" bench/gpu_check.py "$OUT/gpu_check.json" --stage "$stage" --compile "$compile" \
    --rows $ROWS --warmup "$WARMUP" --steps "$STEPS" "${extra[@]}" -- \
    --config configs/demo.yaml \
    --set "data.root=$WORK/shards" --set "data.loader_workers=$LOADERS" \
    --set "run.storage=$WORK/runs" --set "model.preset=$PRESET" --set model.image_size=0 \
    --set "train.use_gpu=$USE_GPU" --set "train.precision=$PRECISION" --set train.num_workers=1 \
    > "$OUT/zero$stage-compile-$compile.log" 2>&1 \
    || { echo "zero$stage compile=$compile stopped (exit $?, limit $limit s); the end of its log:"; tail -25 "$OUT/zero$stage-compile-$compile.log"; }
  grep '^GPU_CHECK ' "$OUT/zero$stage-compile-$compile.log" | cut -c11- || true
  echo "zero$stage compile=$compile: $((SECONDS - t)) s"
done
echo "total $((SECONDS - START)) s; results in $OUT/gpu_check.json"
cat "$OUT/gpu_check.json"
