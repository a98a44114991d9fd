#!/usr/bin/env bash
# The production job on one GPU (issue 28 item 3), one prepared run for a lent single-GPU machine: `ray_job.py
# --config configs/paper.yaml` through Ray Train with one GPU worker (NCCL, ZeRO-2, bf16 autocast, torch.compile)
# on the synthetic corpus generated on the machine, STEPS steps at PER_TASK rows per task, a checkpoint every
# CHECKPOINT steps; once the run has logged step KILL_AT, its worker is SIGKILLed from outside, Ray Train restarts
# it from the newest checkpoint, the run trains to STEPS, evaluates the test split and prints its RESULT line.
# Then bench/gpu_check.py steps the same engine on a fixed batch of the same rows (no Ray, no loader) for the
# job's samples/s against the bare engine's. Everything goes to $OUT: job.log, gpu_check.json, and gpu_job.json
# (the summary: card, RESULT, the attempts, the kill's step and lost steps, samples/s of each).
# Caption scoring needs java (pycocoevalcap), which the GPU image lacks: without java, captioning is left out of
# the job and of the comparison alike (it says so), and the other tasks train and are evaluated.
#
#   bash bench/gpu_wheels.sh                          here, once: the wheels the device lacks, Ray trimmed -> .whl/
#   device run (carry .whl):  bash bench/gpu_job.sh   ~6 minutes
#   CPU dry run of the same logic:  PYTHON=.venv/bin/python bash bench/gpu_job.sh --cpu   (~4 minutes)
# Settings through the environment: STEPS, CHECKPOINT, KILL_AT, PER_TASK, IMAGES, PRESET, LOADERS, DEADLINE.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/device_setup.sh "${1:-}" gpu-job

if [ "$MODE" = gpu ]; then
  : "${PRESET:=paper}" "${IMAGES:=400}" "${STEPS:=100}" "${CHECKPOINT:=50}" "${KILL_AT:=60}" "${PER_TASK:=128}"
  : "${LOADERS:=8}" "${DEADLINE:=480}"
  SETTINGS=(train.use_gpu=true train.compile=true train.precision=auto)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
  install_wheels
else
  : "${PRESET:=tiny}" "${IMAGES:=40}" "${STEPS:=30}" "${CHECKPOINT:=10}" "${KILL_AT:=15}" "${PER_TASK:=4}"
  : "${LOADERS:=1}" "${DEADLINE:=600}"
  SETTINGS=(train.use_gpu=false train.compile=false train.precision=fp32 model.image_size=64)
  echo "cpu" > "$OUT/card.txt"
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD  # a caller's first: e.g. a trimmed Ray installed elsewhere
fi
"$PY" -c "import torch, ray, deepspeed, webdataset; print('torch', torch.__version__, 'ray', ray.__version__,
'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1

TASKS=(captioning vqa classification regression)
if ! command -v java > /dev/null; then
  echo "no java here: captioning (scored by pycocoevalcap on java) is left out of the job and the comparison"
  TASKS=(vqa classification regression)
fi
"$PY" -m spatialnet_dist.cli shards synth "$WORK/shards" --images "$IMAGES" > "$OUT/synth.log" 2>&1
SETS=(data.root="$WORK/shards" run.storage="$WORK/runs" run.name=gpu-job data.loader_workers="$LOADERS"
      model.preset="$PRESET" train.num_workers=1 train.zero_stage=2 train.max_steps="$STEPS"
      train.checkpoint_every="$CHECKPOINT" train.log_every=5 eval.every=0 eval.at_end=true eval.max_samples=256
      "${SETTINGS[@]}")
for task in captioning vqa classification regression tagging; do
  if [[ " ${TASKS[*]} " == *" $task "* ]]; then
    SETS+=("tasks.$task.enabled=true" "tasks.$task.corpora=[synthetic]" "tasks.$task.global_batch_size=$PER_TASK")
  else
    SETS+=("tasks.$task.enabled=false")
  fi
done
ARGS=(--config configs/paper.yaml)
for s in "${SETS[@]}"; do ARGS+=(--set "$s"); done

# The job, and the SIGKILL of its worker once metrics.jsonl has a step >= KILL_AT (the pid from the controller's
# "(ip=..., pid=N) world_rank=0," line, the newest one: a restarted worker has another).
METRICS="$WORK/runs/gpu-job/metrics.jsonl"
START=$SECONDS
timeout "$DEADLINE" "$PY" ray_job.py "${ARGS[@]}" > "$OUT/job.log" 2>&1 &
JOB=$!
last_step() { grep -o '"step": [0-9]*' "$METRICS" 2>/dev/null | tail -1 | grep -o '[0-9]*$' || echo 0; }
killed_at=""
while kill -0 "$JOB" 2>/dev/null; do
  step=$(last_step)
  if [ -z "$killed_at" ] && [ "$step" -ge "$KILL_AT" ]; then
    pid=$(grep -oP '\(ip=[^,]+, pid=\K[0-9]+(?=\) world_rank=0,)' "$OUT/job.log" | tail -1)
    if [ -n "$pid" ]; then
      kill -9 "$pid" && killed_at=$step && echo "SIGKILLed worker pid $pid after step $step ($((SECONDS - START)) s)"
    fi
  fi
  sleep 0.5
done
code=0; wait "$JOB" || code=$?
echo "job exit $code after $((SECONDS - START)) s"
grep -v '^RESULT ' "$OUT/job.log" | tail -3
cp "$METRICS" "$OUT/metrics.jsonl" 2>/dev/null || true
cp "$WORK/runs/gpu-job/attempts.json" "$OUT/attempts.json" 2>/dev/null || true

# The bare engine on a fixed batch of the same rows: what the job's samples/s is measured against.
rows=$((PER_TASK * ${#TASKS[@]}))
: > "$OUT/gpu_check.json"
check=(--config configs/demo.yaml --set data.root="$WORK/shards" --set run.storage="$WORK/check-runs"
       --set model.preset="$PRESET" --set train.num_workers=1)
for s in "${SETTINGS[@]}"; do check+=(--set "$s"); done
for task in captioning vqa classification regression tagging; do
  [[ " ${TASKS[*]} " == *" $task "* ]] || check+=(--set "tasks.$task.enabled=false")
done
compile=$([ "$MODE" = gpu ] && echo true || echo false)
timeout 240 "$PY" bench/gpu_check.py "$OUT/gpu_check.json" --stage 2 --compile "$compile" --rows "$rows" \
  --warmup 3 --steps 10 -- "${check[@]}" > "$OUT/gpu_check.log" 2>&1 || { echo "gpu_check failed:"; tail -20 "$OUT/gpu_check.log"; }

"$PY" - "$OUT" "$code" "${killed_at:-0}" "$KILL_AT" "$CHECKPOINT" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out, code, killed_at, kill_at, every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
log = (out / "job.log").read_text(errors="replace").splitlines()
result = next((json.loads(line[7:]) for line in reversed(log) if line.startswith("RESULT ")), None)
lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").is_file() else []
rates = [m["samples_per_s"] for m in lines if "samples_per_s" in m][1:]  # the first interval holds the compile
attempts = json.loads((out / "attempts.json").read_text()) if (out / "attempts.json").is_file() else []
check = [json.loads(x) for x in (out / "gpu_check.json").read_text().splitlines() if x.strip()]
bare = check[0]["samples_per_s"] if check else None
job = statistics.median(rates) if rates else None
summary = {
    "card": (out / "card.txt").read_text().strip(), "exit": code, "result": result,
    "killed_after_step": killed_at or None, "kill_at": kill_at, "checkpoint_every": every,
    "attempts": [{k: a.get(k) for k in ("start_step", "cause", "lost_steps", "world_size")} for a in attempts],
    "job_samples_per_s_median": round(job, 1) if job else None, "job_samples_per_s_intervals": len(rates),
    "bare_engine_samples_per_s": bare, "job_over_bare": round(job / bare, 3) if job and bare else None,
    "gpu_check": check[0] if check else None,
}
(out / "gpu_job.json").write_text(json.dumps(summary, indent=1))
brief = {k: v for k, v in summary.items() if k not in ("result", "gpu_check")}
if result:  # the RESULT's run and the evaluation's headline figures (gpu_job.json holds all of it)
    brief["result"] = {k: result.get(k) for k in ("final_step", "restarts", "resumed_from", "lost_steps", "wall_s", "error")}
    brief["eval"] = {task: {k: v for k, v in scores.items() if k in ("CIDEr", "BLEU-4", "OA", "accuracy", "MAE")}
                     for task, scores in (result.get("eval") or {}).items()}
print("GPU_JOB " + json.dumps(brief))
PYEOF
exit "$code"
