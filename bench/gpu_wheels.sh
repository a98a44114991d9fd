#!/usr/bin/env bash
# Fetch, on this machine, the wheels that bench/gpu_check.sh installs on a lent GPU machine: that machine
# reaches no package registry, and its image (CPython 3.12, torch, timm, numpy, pyyaml, pillow, psutil,
# msgpack, einops, ninja, py-cpuinfo, nvidia-ml-py, ...) lacks DeepSpeed, WebDataset and their small pure
# dependencies. Versions are the ones installed in .venv, so the GPU run uses the code the CPU tests use;
# timm and typing-extensions travel too, because the image's versions are not known in advance.
# DeepSpeed publishes only a source archive: it is built here into a pure-python wheel (no compiled ops).
# Ray (bench/gpu_job.sh runs the job through Ray Train) travels trimmed: its 75 MiB wheel, less the Java jars,
# RLlib, Serve and LLM, none of which a Train job imports, is ~42 MiB (the dashboard's web client stays: Ray
# refuses to start its dashboard without it). With it come the small dependencies of ray[train] that the image
# lacks (jsonschema and its three, tensorboardX).
#
#   bash bench/gpu_wheels.sh        -> .whl/*.whl (~51 MiB of the 64 a device call carries; .whl/ is added to
#                                      .git/info/exclude)
#   WITHOUT_RAY=1 bash bench/gpu_wheels.sh   -> without Ray (~8 MB): what bench/gpu_check.sh needs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# Packages the device image lacks (or whose version must match ours) -> pinned to .venv's versions.
PACKAGES=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
          webdataset braceexpand timm)
if [ -z "${WITHOUT_RAY:-}" ]; then
  PACKAGES+=(ray jsonschema jsonschema-specifications referencing rpds-py tensorboardX)
fi
# Ray's parts that a Train job never imports: Java workers, RLlib, Serve, LLM.
RAY_UNUSED=(ray/jars/ ray/rllib/ ray/serve/ ray/llm/)
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
if compgen -G ".whl/ray-*.whl" > /dev/null; then
  # Rewrite the wheel without those folders, and its RECORD without their lines (the rest keep their hashes).
  "$PY" - "${RAY_UNUSED[@]}" <<'PYEOF'
import glob, os, sys, zipfile
unused = tuple(sys.argv[1:])
(path,) = glob.glob(".whl/ray-*.whl")
trimmed = path + ".trimmed"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if item.filename.startswith(unused):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not line.startswith(unused)).encode()
        dst.writestr(item, data)
os.replace(trimmed, path)
PYEOF
fi
ls -l .whl
du -sh .whl
