# One command each on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both depend on `setup`, which creates .venv and installs the project with its test extras.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-compiles a small op on first use (~60 s); keep it across runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
# The venv's tools first, as `activate` puts them: the op's build runs `ninja`, and the venv's (1.13) and a system
# one (Debian's 1.11) write build logs the other cannot read, so an op built by one was rebuilt by the other
# (77 s at the demo's first step after `make test`, whose Ray clusters put .venv/bin first).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-fast lint docs bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml spatialnet_dist/requirements.txt constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "setup: $(PYTHON) not found (Python >= 3.10 needed)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins torch with torchvision: a resolver that picks another torch downloads GBs.
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	bash scripts/ensure-java.sh
	# DeepSpeed's CPU shared-memory all-reduce op compiles on first use (~60 s, cached in TORCH_EXTENSIONS_DIR):
	# build it here, so that the demo's first step (and the first test that starts an engine) does not wait on gcc.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

demo: setup
	$(PY) ray_job.py

# Two pytest processes: half of a serial run's time the 2 cores sit idle, waiting on Ray clusters, restarts and S3
# outages (--dist loadfile: each file's tests in one process; --no-loadscope-reorder: the files in conftest's order,
# the longest first). The 30 slowest in CI's output: where the budget goes.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# The documentation site (mkdocs.yml) into site/; --strict: a broken link or an unreadable docstring fails it.
docs: setup
	$(VENV)/bin/mkdocs build --strict

bench: setup
	$(PY) bench/model_step.py --json
	$(PY) bench/data_throughput.py --json
	$(PY) bench/overhead.py --json
	$(PY) bench/zero_memory.py --json

clean:
	rm -rf $(VENV) .torch_extensions runs site quickstart
