# Sourced by the device scripts (bench/gpu_check.sh, bench/gpu_job.sh) after `set -euo pipefail` and `cd` to the
# repository: MODE (gpu, or cpu with --cpu: the dry run), PY, OUT (the results), WORK (corpus, runs and
# checkpoints, removed at exit) and the environment; `install_wheels` puts what bench/gpu_wheels.sh fetched on
# PYTHONPATH (the GPU image lacks Ray, DeepSpeed and WebDataset). $1: the script's first argument; $2: its name.
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; fi
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d "/tmp/$2-out-XXXX")}
mkdir -p "$OUT"
WORK=$(mktemp -d "/tmp/$2-XXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}

install_wheels() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  else
    export PYTHONPATH=$PWD
  fi
}
