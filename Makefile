# The README's commands. Each target creates or updates .venv first; the stamp files make a
# second run skip the install when pyproject.toml has not changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

# The classic tutorial: seed CNN on MNIST, 5 epochs, then the test-set evaluation.
demo: $(VENV)/.installed
	$(BIN)/cnnkit train --data mnist --model seed-cnn --epochs 5 --name demo-mnist --overwrite
	$(BIN)/cnnkit evaluate runs/demo-mnist --split test

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/seed_mnist.py
	$(BIN)/python benchmarks/folder_pipeline.py
	$(BIN)/python benchmarks/serve_load.py
