# Two commands for a fresh machine: `make simulate` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (CI pins it; GPU sites may install a newer CUDA build instead).
TORCH_PIN ?= torch==2.13.0
# Programs of the venv (flwr, flower-superlink, flower-superexec that Flower starts by name) come first on PATH,
# as if the venv were activated.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install simulate train test test-fast bench clean

$(BIN)/lungmae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
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

# Every benchmark (not part of `make test`); figures and the commands behind them: docs/performance.md.
# Slow (tens of minutes on 2 cores, paper-size models); JSON records go to runs/bench/.
BENCH := runs/bench
bench: install
	mkdir -p $(BENCH)
	$(BIN)/python benchmarks/mae_step.py --configs tiny paper-p16 paper-p8 --json $(BENCH)/mae_step.json
	$(BIN)/python benchmarks/profile_step.py --configs paper-p16 paper-p8
	$(BIN)/python benchmarks/dp_step.py --configs tiny paper-p16 --modes hooks bookkeeping --interleave \
		--json $(BENCH)/dp_step.json
	$(BIN)/python benchmarks/server_memory.py --json $(BENCH)/server_memory.json
	$(BIN)/python benchmarks/server_memory.py --methods median --modes stream --json $(BENCH)/server_memory_median.json
	$(BIN)/python benchmarks/round_overhead.py --json $(BENCH)/round_overhead.json
	$(BIN)/python benchmarks/prepare.py --json $(BENCH)/prepare.json
	$(BIN)/python benchmarks/simulate.py --json $(BENCH)/simulate.json

clean:
	rm -rf runs .pytest_cache
