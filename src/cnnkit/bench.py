"""``cnnkit bench``: the recipes and the code people would otherwise run, side by side.

Measurements (one JSON line per run, then a summary per measurement and the ratios):

- ``tutorial``: the Keras tutorial recipe in cnnkit (seed-cnn, batch 32, Adam 1e-3, 5 epochs)
  with the default settings (bf16 autocast where the CPU or GPU computes in bf16 natively);
- ``tutorial-fp32``: the same in float32, to show what the default precision changes;
- ``pytorch-dataloader``: the same recipe as typical PyTorch user code: a TensorDataset of
  normalised float images, a shuffling DataLoader, a loop that reads ``loss.item()`` every
  step;
- ``keras``: the tutorial's own Keras/TensorFlow code (``benchmarks/bench_keras.py`` in the
  source tree), run with a Python that has TensorFlow (``--keras-python``; skipped when
  there is none);
- ``mnist-fast`` and ``fashion-mnist-fast``: the fast CPU recipes (``cnnkit/recipes/``);
- ``mnist-gpu-fast``, ``mnist-gpu-accurate`` and ``fashion-mnist-gpu``: the GPU recipes
  (torch.compile, bf16, data and augmentation on the GPU), run by default only where CUDA
  is available.

Each runs once per seed, interleaved. Training time is the sum of the epochs' training
seconds (no validation pass, no data loading), for the peers too; on a GPU it comes from
CUDA events. With torch.compile, the steps that compiled are left out of the training time
and reported as ``compile_seconds``. Accuracy is on the official test set. Timings on
shared machines vary: compare within one invocation.
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

from cnnkit.config import RECIPES, Config, apply_overrides, load_config
from cnnkit.data import load_dataset
from cnnkit.device import ExecutionContext, describe
from cnnkit.runs.directory import throughput
from cnnkit.train.api import train

# The Keras peer is a TensorFlow script, run by another Python: it lives with the other
# benchmark scripts in the source tree, not in the installed package.
KERAS_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_keras.py"


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def run_recipe(
    name: str, recipe: Path | None, seed: int, epochs: int | None = None, **settings
) -> dict:
    cfg = apply_overrides(Config(), load_config(recipe)) if recipe else Config()
    overrides = {"seed": seed, **settings}
    if epochs:
        overrides["epochs"] = epochs
    with tempfile.TemporaryDirectory() as runs:
        run = train(apply_overrides(cfg, overrides), runs_dir=runs, quiet=True)
        accuracy = run.evaluate(split="test", save=False).accuracy
        return measurement(name, seed, run.config, run.history, accuracy)


def measurement(name: str, seed: int, config, history: list[dict], accuracy: float) -> dict:
    """One run's JSON record from its config and epoch rows: the training time without the
    steps that compiled (reported apart), and the throughput over that time (which counts
    the compiling steps' images too: one or two batches per run)."""
    ctx = ExecutionContext.resolve(device=config.train.device, precision=config.train.precision)
    seconds = [r["seconds"] for r in history]
    images, _ = throughput(history)
    compiling = sum(r.get("compile_seconds") or 0.0 for r in history)
    train_seconds = sum(seconds) - compiling
    record = {
        "benchmark": name,
        "seed": seed,
        "device": describe(ctx.device),
        "data": config.data.name,
        "epochs": len(history),
        "batch_size": config.train.batch_size,
        "precision": config.train.precision,
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": [round(s, 2) for s in seconds],
        "val_acc_per_epoch": [
            None if r.get("val_acc") is None else round(r["val_acc"], 4) for r in history
        ],
        "images_per_s": round(images / train_seconds),
        "test_accuracy": accuracy,
    }
    if config.train.compile:
        record["compile_seconds"] = round(compiling, 2)
    return record


def pytorch_dataloader_peer(epochs: int, seed: int = 0) -> dict:
    """The tutorial recipe as a PyTorch user typically writes it."""
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

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


def has_tensorflow(python: str) -> bool:
    return subprocess.run([python, "-c", "import tensorflow"], capture_output=True).returncode == 0


def keras_peer(python: str, epochs: int, seed: int = 0) -> dict:
    """The Keras tutorial, run by a Python that has TensorFlow."""
    out = subprocess.run(
        [python, str(KERAS_SCRIPT), "--epochs", str(epochs), "--seed", str(seed)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"the Keras benchmark failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def summarise(name: str, runs: list[dict]) -> dict:
    """Medians and ranges over the runs (one per seed) of one measurement."""
    times = [r["train_seconds"] for r in runs]
    accs = [r["test_accuracy"] for r in runs]
    summary = {
        "benchmark": f"{name} (summary)",
        "runs": len(runs),
        "train_seconds_median": round(statistics.median(times), 2),
        "train_seconds_min": min(times),
        "train_seconds_max": max(times),
        "images_per_s_median": round(statistics.median(r["images_per_s"] for r in runs)),
        "test_accuracy_mean": round(statistics.mean(accs), 4),
        "test_accuracy_min": min(accs),
        "test_accuracy_max": max(accs),
    }
    compiling = [r["compile_seconds"] for r in runs if "compile_seconds" in r]
    if compiling:
        summary["compile_seconds_median"] = round(statistics.median(compiling), 2)
    return summary


def ratios(summaries: dict[str, dict]) -> dict[str, float]:
    """By peer: cnnkit's tutorial throughput (median over seeds) over the peer's (higher is
    better for cnnkit)."""
    if "tutorial" not in summaries:
        return {}
    speed = {name: r["images_per_s_median"] for name, r in summaries.items()}
    return {name: speed["tutorial"] / speed[name] for name in PEERS if name in speed}


GPU_RECIPES = ("mnist-gpu-fast", "mnist-gpu-accurate", "fashion-mnist-gpu")
MEASUREMENTS = (
    "tutorial",
    "tutorial-fp32",
    "pytorch-dataloader",
    "keras",
    "mnist-fast",
    "fashion-mnist-fast",
    *GPU_RECIPES,
)
PEERS = ("tutorial-fp32", "pytorch-dataloader", "keras")


def default_measurements() -> list[str]:
    """What ``cnnkit bench`` runs when not told: all, the GPU recipes only on a CUDA GPU."""
    return [m for m in MEASUREMENTS if torch.cuda.is_available() or m not in GPU_RECIPES]


def bench(
    only: list[str] | None = None, seeds: int = 3, epochs: int = 5, keras_python: str | None = None
) -> dict[str, dict]:
    """Every measurement once per seed, interleaved (seed 0 of each, then seed 1, ...) so
    that a slow spell of a shared machine does not fall on one of them only; then a summary
    per measurement and the throughput ratios. Returns the summaries by name.

    Without ``only``: everything, except the GPU recipes where there is no CUDA GPU."""
    wanted = [m for m in MEASUREMENTS if m in set(only or default_measurements())]
    unknown = set(only or ()) - set(MEASUREMENTS)
    if unknown:
        raise ValueError(
            f"unknown measurement(s) {sorted(unknown)}; choose from {', '.join(MEASUREMENTS)}"
        )
    python = keras_python or sys.executable
    if "keras" in wanted and not KERAS_SCRIPT.is_file():
        emit({"benchmark": "keras", "skipped": f"{KERAS_SCRIPT} not here: run from a checkout"})
        wanted.remove("keras")
    if "keras" in wanted and not has_tensorflow(python):
        emit({"benchmark": "keras", "skipped": f"no TensorFlow in {python}; pass --keras-python"})
        wanted.remove("keras")
    tutorial = RECIPES / "mnist-tutorial.yaml"
    runners = {
        "tutorial": lambda seed: run_recipe("tutorial", tutorial, seed, epochs),
        "tutorial-fp32": lambda seed: run_recipe(
            "tutorial-fp32", tutorial, seed, epochs, precision="fp32"
        ),
        "pytorch-dataloader": lambda seed: pytorch_dataloader_peer(epochs, seed),
        "keras": lambda seed: keras_peer(python, epochs, seed),
    }
    for recipe in ("mnist-fast", "fashion-mnist-fast", *GPU_RECIPES):
        runners[recipe] = lambda seed, r=recipe: run_recipe(r, RECIPES / f"{r}.yaml", seed)
    runs: dict[str, list[dict]] = {name: [] for name in wanted}
    for seed in range(seeds):
        for name in wanted:
            runs[name].append(emit(runners[name](seed)))
    summaries = {name: emit(summarise(name, r)) for name, r in runs.items()}
    for peer, ratio in ratios(summaries).items():
        per_seed = [  # paired: the same seed, run one after the other
            round(a["images_per_s"] / b["images_per_s"], 2)
            for a, b in zip(runs["tutorial"], runs[peer], strict=True)
        ]
        emit(
            {
                "benchmark": "ratio",
                "comparison": f"tutorial vs {peer}",
                "images_per_s_ratio": round(ratio, 2),
                "per_seed": per_seed,
            }
        )
    return summaries
