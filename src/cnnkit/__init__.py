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

__all__ = [
    "Config",
    "Prediction",
    "Run",
    "__version__",
    "create_model",
    "list_models",
    "load_dataset",
    "load_run",
    "resume",
    "train",
]
