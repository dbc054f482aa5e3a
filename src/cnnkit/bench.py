"""``cnnkit bench``: the recipes and the code people would otherwise run, side by side.

Measurements (one JSON line each, then a table of ratios):

- ``tutorial``: the Keras tutorial recipe in cnnkit (seed-cnn, batch 32, Adam 1e-3, fp32);
- ``pytorch-dataloader``: the same recipe as typical PyTorch user code: a TensorDataset of
  normalised float images, a shuffling DataLoader, a loop that reads ``loss.item()`` every
  step;
- ``keras``: the tutorial's own Keras/TensorFlow code (``cnnkit/bench_keras.py``), run
  with a Python that has TensorFlow (``--keras-python``; skipped when there is none);
- ``mnist-fast`` and ``fashion-mnist-fast``: the fast recipes (``cnnkit/recipes/``), one run per
  seed, reported as the median training time with its spread and the accuracy per seed.

Training time is the sum of the epochs' training seconds (no validation, no data loading);
accuracy is on the official test set. Timings on shared machines vary: compare within one
invocation.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPES = Path(__file__).resolve().parent / "recipes"


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def run_recipe(
    name: str, recipe: Path | None, seed: int, epochs: int | None = None, **settings
) -> dict:
    import cnnkit
    from cnnkit.config import Config, apply_overrides, load_config

    cfg = apply_overrides(Config(), load_config(recipe)) if recipe else Config()
    overrides = {"seed": seed, **settings}
    if epochs:
        overrides["epochs"] = epochs
    with tempfile.TemporaryDirectory() as runs:
        run = cnnkit.train(apply_overrides(cfg, overrides), runs_dir=runs, quiet=True)
        accuracy = run.evaluate(split="test", save=False).accuracy
        history = run.history
    seconds = [r["seconds"] for r in history]
    images = sum(r["images_per_s"] * r["seconds"] for r in history)
    return {
        "benchmark": name,
        "seed": seed,
        "data": run.config.data.name,
        "epochs": len(history),
        "batch_size": run.config.train.batch_size,
        "precision": run.config.train.precision,
        "train_seconds": round(sum(seconds), 2),
        "seconds_per_epoch": [round(s, 2) for s in seconds],
        "images_per_s": round(images / sum(seconds)),
        "test_accuracy": accuracy,
    }


def pytorch_dataloader_peer(epochs: int, seed: int = 0) -> dict:
    """The tutorial recipe as a PyTorch user typically writes it."""
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from cnnkit.data import load_dataset

    torch.manual_seed(seed)
    data = load_dataset("mnist", val_split=0.1, seed=seed)

    def as_float(images):  # ToTensor + Normalize((0.1307,), (0.3081,)), done once up front
        return (images.float() / 255 - 0.1307) / 0.3081

    train = DataLoader(
        TensorDataset(as_float(data.train.images), data.train.labels), batch_size=32, shuffle=True
    )
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1600, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds = []
    for _ in range(epochs):
        model.train()
        t0, running = time.perf_counter(), 0.0
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()  # what the tutorials print every N steps
        seconds.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        test = as_float(data.test.images)
        predicted = torch.cat([model(x).argmax(1) for x in test.split(1000)])
    n = len(data.train)
    return {
        "benchmark": "pytorch-dataloader",
        "seed": seed,
        "epochs": epochs,
        "batch_size": 32,
        "train_seconds": round(sum(seconds), 2),
        "seconds_per_epoch": [round(s, 2) for s in seconds],
        "images_per_s": round(n * epochs / sum(seconds)),
        "test_accuracy": float((predicted == data.test.labels).float().mean()),
    }


def keras_peer(python: str, epochs: int) -> dict | None:
    """The Keras tutorial in a Python that has TensorFlow; None when there is none."""
    script = Path(__file__).with_name("bench_keras.py")
    probe = subprocess.run([python, "-c", "import tensorflow"], capture_output=True)
    if probe.returncode != 0:
        return None
    out = subprocess.run(
        [python, str(script), "--epochs", str(epochs)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"the Keras benchmark failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def summarise(name: str, runs: list[dict]) -> dict:
    times = [r["train_seconds"] for r in runs]
    accs = [r["test_accuracy"] for r in runs]
    return {
        "benchmark": f"{name} (summary)",
        "runs": len(runs),
        "train_seconds_median": round(statistics.median(times), 2),
        "train_seconds_min": min(times),
        "train_seconds_max": max(times),
        "test_accuracy_mean": round(statistics.mean(accs), 4),
        "test_accuracy_min": min(accs),
        "test_accuracy_max": max(accs),
    }


def ratios(results: dict[str, dict]) -> list[tuple[str, float]]:
    """cnnkit's tutorial throughput over each peer's (higher is better for cnnkit)."""
    base = results.get("tutorial")
    if not base:
        return []
    return [
        (f"tutorial vs {name}", base["images_per_s"] / r["images_per_s"])
        for name, r in results.items()
        if name != "tutorial" and r.get("images_per_s")
    ]


def bench(
    only: list[str] | None = None, seeds: int = 3, epochs: int = 5, keras_python: str | None = None
) -> dict:
    wanted = set(
        only or ["tutorial", "pytorch-dataloader", "keras", "mnist-fast", "fashion-mnist-fast"]
    )
    results: dict[str, dict] = {}
    if "tutorial" in wanted:
        results["tutorial"] = emit(
            run_recipe("tutorial", RECIPES / "mnist-tutorial.yaml", 0, epochs)
        )
    if "pytorch-dataloader" in wanted:
        results["pytorch-dataloader"] = emit(pytorch_dataloader_peer(epochs))
    if "keras" in wanted:
        keras = keras_peer(keras_python or sys.executable, epochs)
        if keras is None:
            emit(
                {
                    "benchmark": "keras",
                    "skipped": "no TensorFlow in "
                    f"{keras_python or sys.executable}; pass --keras-python",
                }
            )
        else:
            results["keras"] = emit(keras)
    for name in ("mnist-fast", "fashion-mnist-fast"):
        if name in wanted:
            runs = [emit(run_recipe(name, RECIPES / f"{name}.yaml", seed)) for seed in range(seeds)]
            results[name] = emit(summarise(name, runs))
    for label, ratio in ratios(results):
        emit({"benchmark": "ratio", "comparison": label, "images_per_s_ratio": round(ratio, 2)})
    return results
