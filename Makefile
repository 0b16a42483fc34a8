# Two commands for a fresh machine: `make simulate` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (CI pins it; GPU sites may install a newer CUDA build instead). The lock files leave
# torch out (requirements/torch-constraint.txt says why), so it is installed first.
TORCH_PIN ?= torch==2.13.0
# Programs of the venv (flwr, flower-superlink, flower-superexec that Flower starts by name) come first on PATH,
# as if the venv were activated.
export PATH := $(abspath $(BIN)):$(PATH)
PIP_COMPILE = $(BIN)/pip-compile -q --generate-hashes --strip-extras --unsafe-package torch --no-emit-index-url \
	--no-emit-find-links -c requirements/torch-constraint.txt

.PHONY: install simulate train test test-fast lint bench lock image image-offline clean

# Everything from the lock (hashes checked), then the project itself without dependencies.
$(BIN)/lungmae: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps -e ".[sim,dev]"
	$(BIN)/pip check
	touch $@

install: $(BIN)/lungmae

simulate: install
	$(BIN)/lungmae simulate --workdir runs/simulate

train: install
	$(BIN)/lungmae train --workdir runs/train

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Lint: ruff (pyproject.toml [tool.ruff]: pycodestyle, pyflakes, import order, bugbear, pyupgrade) over the tree,
# then mypy --strict on lungmae_core/, client/ and server/ (pyproject.toml [tool.mypy]; experiment/ excluded
# until it passes). .ci/run runs it before
# the tests, .pre-commit-config.yaml before each commit. Formatting (`ruff format`) is not enforced yet.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Every benchmark (not part of `make test`); figures and the commands behind them: docs/performance.md.
# Slow: hours on 2 cores (paper-size models, DP utility over 3 seeds, the experiment's quick profile); JSON
# records go to runs/bench/.
BENCH := runs/bench
bench: install
	mkdir -p $(BENCH)
	$(BIN)/python benchmarks/mae_step.py --configs tiny paper-p16 paper-p8 --json $(BENCH)/mae_step.json
	$(BIN)/python benchmarks/mae_step.py --configs paper-p16 --variants ours --batch 4 --json $(BENCH)/mae_step_b4.json
	$(BIN)/python benchmarks/mae_step.py --configs paper-p16 --variants ours ours-compiled \
		--json $(BENCH)/mae_step_compiled.json
	$(BIN)/python benchmarks/profile_step.py --configs paper-p16 paper-p8
	$(BIN)/python benchmarks/dp_step.py --configs tiny paper-p16 --modes hooks bookkeeping --interleave \
		--threads 1 --timed 6 --json $(BENCH)/dp_step.json
	$(BIN)/python benchmarks/dp_step.py --configs paper-p16 --modes bookkeeping --interleave --threads 1 \
		--timed 4 --batch 8 --json $(BENCH)/dp_step_b8.json
	$(BIN)/python benchmarks/dp_step.py --configs paper-p16 --modes hooks bookkeeping bk-ghost bk-instantiate \
		--flops --json $(BENCH)/dp_flops.json
	$(BIN)/python benchmarks/dp_step.py --configs paper-p16 --modes bookkeeping --threads 1 --profile
	$(BIN)/python benchmarks/server_memory.py --json $(BENCH)/server_memory.json
	$(BIN)/python benchmarks/server_memory.py --configs paper-p16 tiny --modes stream \
		--allocator fixed-mmap glibc-default --json $(BENCH)/server_memory_allocator.json
	$(BIN)/python benchmarks/server_memory.py --configs tiny --methods median --modes stream \
		--json $(BENCH)/server_memory_median.json
	$(BIN)/python benchmarks/compression_accuracy.py --json $(BENCH)/compression_accuracy.json
	$(BIN)/python benchmarks/update_coding.py --configs tiny paper-p16 --json $(BENCH)/update_coding.json
	$(BIN)/python benchmarks/exchange_latency.py --json $(BENCH)/exchange_latency.json
	$(BIN)/python benchmarks/round_overhead.py --json $(BENCH)/round_overhead.json
	$(BIN)/python benchmarks/deployment_round.py --json $(BENCH)/deployment_round.json
	$(BIN)/python benchmarks/prepare.py --json $(BENCH)/prepare.json
	$(BIN)/python benchmarks/simulate.py --json $(BENCH)/simulate.json
	$(BIN)/python benchmarks/transforms.py
	$(BIN)/python benchmarks/dp_utility.py --workdir $(BENCH)/dp-utility
	$(BIN)/python benchmarks/experiment.py --profile quick --json $(BENCH)/experiment.json

# Re-resolve the lock files after a change of pyproject.toml's dependencies (needs PyPI).
lock:
	test -x $(BIN)/pip-compile || { $(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q pip-tools; }
	$(PIP_COMPILE) --extra site -o requirements/site.txt pyproject.toml
	$(PIP_COMPILE) --extra site --extra server -o requirements/deploy.txt pyproject.toml
	$(PIP_COMPILE) --extra sim --extra dev -o requirements/dev.txt pyproject.toml

# The container image (deploy/Dockerfile) with podman, or docker where its daemon runs.
image:
	deploy/image/build.sh

# The same from a base image made of Debian's packages (mmdebstrap), for hosts that reach no registry.
image-offline:
	BASE_IMAGE=debian-local deploy/image/build.sh

clean:
	rm -rf runs .pytest_cache .whl
