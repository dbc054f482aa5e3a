"""cnnkit: train, evaluate and deploy image classifiers.

import cnnkit
run = cnnkit.train(data="mnist", model="seed-cnn", epochs=5)
report = run.evaluate(split="test")
run.predict(["digit.png"])
"""

__version__ = "0.1.0"

from cnnkit.config import Config
from cnnkit.data import load_dataset
from cnnkit.models import create_model, list_models
from cnnkit.run import Prediction, Run, load_run
from cnnkit.train.api import resume, train


def load(path, **kwargs):
    """A run directory (or checkpoint) as a Run, or an exported .onnx file as an OnnxModel;
    both have ``predict(images)``."""
    from pathlib import Path

    if Path(path).suffix == ".onnx":
        from cnnkit.deploy.onnx_model import OnnxModel

        return OnnxModel(path)
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
    "resume",
    "train",
]
