"""cnnkit: train, evaluate and deploy image classifiers.

import cnnkit
run = cnnkit.train(data="mnist", model="seed-cnn", epochs=5)
report = run.evaluate(split="test")
run.predict(["digit.png"])

The public names are imported on first use (PEP 562), so ``import cnnkit`` and
``cnnkit --help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib

from cnnkit.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "Config": "cnnkit.config",
    "load_dataset": "cnnkit.data",
    "create_model": "cnnkit.models",
    "list_models": "cnnkit.models",
    "Prediction": "cnnkit.runs.inference",
    "Run": "cnnkit.runs.run",
    "load_run": "cnnkit.runs.run",
}


_SUBPACKAGES = ("config", "data", "deploy", "device", "evaluate", "models", "runs", "version")


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # cnnkit.models.list_models() after a plain 'import cnnkit'
        return importlib.import_module(f"cnnkit.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cnnkit' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


# cnnkit.train is both the training subpackage and the train() function. Importing any
# cnnkit.train.* module for the first time binds the subpackage to the name, so the
# (import-free) subpackage is loaded here first and the functions are bound after it.
importlib.import_module("cnnkit.train")


# The same for cnnkit.tune, the module (light: it imports neither torch nor optuna) and the
# function.
importlib.import_module("cnnkit.tune")


def tune(config=None, **kwargs):
    """Hyperparameter search with Optuna; returns a TuneResult (see cnnkit.tune.tune)."""
    from cnnkit.tune import tune as _tune

    return _tune(config, **kwargs)


def train(config=None, **kwargs):
    """Train a model and return its Run (see cnnkit.train.api.train for the settings)."""
    from cnnkit.train.api import train as _train

    return _train(config, **kwargs)


def resume(path, **kwargs):
    """Continue a run from its last.pt (see cnnkit.train.api.resume)."""
    from cnnkit.train.api import resume as _resume

    return _resume(path, **kwargs)


def lr_find(config=None, **kwargs):
    """The learning-rate range test; its ``suggestion`` (see cnnkit.train.lr_find)."""
    from cnnkit.train.api import lr_find as _lr_find

    return _lr_find(config, **kwargs)


def load(path, **kwargs):
    """A run directory (or checkpoint) as a Run, or an exported .onnx file as an OnnxModel;
    both have ``predict(images)``."""
    from pathlib import Path

    if Path(path).suffix == ".onnx":
        from cnnkit.deploy.onnx_model import OnnxModel

        return OnnxModel(path)
    from cnnkit.runs.run import load_run

    return load_run(path, **kwargs)


__all__ = [
    "Config",
    "Prediction",
    "Run",
    "__version__",
    "create_model",
    "list_models",
    "load",
    "load_dataset",
    "load_run",
    "lr_find",
    "resume",
    "train",
    "tune",
]
