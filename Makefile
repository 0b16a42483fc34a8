# Two commands for a fresh machine: `make simulate` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (CI pins it; GPU sites may install a newer CUDA build instead).
TORCH_PIN ?= torch==2.13.0
# Programs of the venv (flwr, flower-superlink, flower-superexec that Flower starts by name) come first on PATH,
# as if the venv were activated.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install simulate train test test-fast clean

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

clean:
	rm -rf runs .pytest_cache
