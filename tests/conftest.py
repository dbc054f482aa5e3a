import os
from pathlib import Path

import pytest

from cnnkit.data import BUILTINS, is_available


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """No test downloads or writes into the user's cache."""
    monkeypatch.setenv("CNNKIT_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def _require(name: str) -> Path:
    where = is_available(BUILTINS[name])
    if where is None:
        message = f"{name} not found; set CNNKIT_DATA to a directory holding {name}/"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the real-data tests, never skip them
        pytest.skip(message)
    return where


@pytest.fixture
def mnist_dir() -> Path:
    """The directory holding the official MNIST files (from $CNNKIT_DATA)."""
    return _require("mnist")


@pytest.fixture
def fashion_dir() -> Path:
    return _require("fashion-mnist")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A seed-cnn trained for one epoch on 2,000 MNIST digits (module-shared, ~3 s)."""
    if is_available(BUILTINS["mnist"]) is None:
        pytest.skip("MNIST not available")
    import cnnkit

    runs = tmp_path_factory.mktemp("runs")
    return cnnkit.train(
        data="mnist", model="seed-cnn", epochs=1, limit=2000, runs_dir=str(runs), quiet=True
    )
