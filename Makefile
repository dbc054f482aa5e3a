# The README's commands. Each target creates or updates .venv first; the stamp files make a
# second run skip the install when pyproject.toml has not changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint docs bench bench-keras ort-web

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

test: $(VENV)/.installed-dev ort-web
	$(BIN)/python -m pytest

# ONNX Runtime Web (JavaScript and WebAssembly) for 'cnnkit export --format webapp' and its
# browser tests: installed once from npm into ~/.cache/cnnkit/onnxruntime-web.
ort-web: $(VENV)/.installed
	$(BIN)/python -m cnnkit.deploy.webapp --fetch-runtime

# The documentation site, offline, as static HTML in docs/_build/html; any warning fails it.
docs: $(VENV)/.installed-dev
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Speed side by side (cnnkit bench: the tutorial recipe, float32, a DataLoader loop, the fast
# recipes; the Keras peer too with KERAS_PYTHON=/a/python/with/tensorflow), then the photo
# pipeline and the serving load test. One JSON line per measurement.
KERAS_PYTHON ?=
bench: $(VENV)/.installed-dev
	$(BIN)/cnnkit bench $(if $(KERAS_PYTHON),--keras-python $(KERAS_PYTHON))
	$(BIN)/python benchmarks/folder_pipeline.py
	$(BIN)/python benchmarks/serve_load.py

# The same with the Keras peer: TensorFlow (tensorflow-cpu from PyPI) in its own venv.
$(VENV)-tf/bin/python:
	$(PYTHON) -m venv $(VENV)-tf
	$(VENV)-tf/bin/python -m pip install --quiet tensorflow-cpu numpy

bench-keras: $(VENV)-tf/bin/python
	$(MAKE) bench KERAS_PYTHON=$(VENV)-tf/bin/python
