# Two commands do everything on a fresh machine: `make run` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: run test bench venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel. Letting pip resolve torch pulls a CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/resbm-node local --steps 200 --run-dir runs/local --json-out runs/local/summary.json $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.convergence $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
