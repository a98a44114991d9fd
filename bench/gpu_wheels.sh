#!/usr/bin/env bash
# Fetch, on this machine, the wheels that bench/gpu_check.sh installs on a lent GPU machine: that machine
# reaches no package registry, and its image (CPython 3.12, torch, timm, numpy, pyyaml, pillow, psutil,
# msgpack, einops, ninja, py-cpuinfo, nvidia-ml-py, ...) lacks DeepSpeed, WebDataset and their small pure
# dependencies. Versions are the ones installed in .venv, so the GPU run uses the code the CPU tests use;
# timm and typing-extensions travel too, because the image's versions are not known in advance.
# DeepSpeed publishes only a source archive: it is built here into a pure-python wheel (no compiled ops).
#
#   bash bench/gpu_wheels.sh        -> .whl/*.whl (about 8 MB; .whl/ is added to .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# Packages the device image lacks (or whose version must match ours) -> pinned to .venv's versions.
PACKAGES=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
          webdataset braceexpand timm)
pins=()
for name in "${PACKAGES[@]}"; do
  pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done

# .whl/ travels with a device call only when named in `carry`, and never belongs in a commit.
if [ -d .git ] && ! grep -qxF '/.whl/' .git/info/exclude 2>/dev/null; then echo '/.whl/' >> .git/info/exclude; fi
rm -rf .whl && mkdir -p .whl
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT

for pin in "${pins[@]}"; do
  case $pin in
    deepspeed==*)
      "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$src" "$pin"
      # DS_BUILD_OPS=0: no CUDA/C++ ops compiled in (DeepSpeed JIT-builds any it needs; AdamW is torch's).
      DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$src"/deepspeed-*.tar.gz ;;
    *)
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$pin" ;;
  esac
done
ls -l .whl
du -sh .whl
