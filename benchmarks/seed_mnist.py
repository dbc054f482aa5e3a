"""Time the tutorial recipe: seed-cnn on MNIST, batch 32, Adam 1e-3 (default 5 epochs).

Prints one JSON line: seconds per epoch (median over epochs, training only), training
images/s, and the test accuracy of the best-on-validation checkpoint. Never fails on timing.

    python benchmarks/seed_mnist.py [--epochs 5] [--precision fp32] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile

import torch

import cnnkit


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as runs:
        run = cnnkit.train(
            data="mnist",
            model="seed-cnn",
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=1e-3,
            optimizer="adam",
            precision=args.precision,
            device=args.device,
            seed=args.seed,
            runs_dir=runs,
            quiet=True,
        )
        history = run.history
        report = run.evaluate(split="test", save=False)
    seconds = [r["seconds"] for r in history]
    print(
        json.dumps(
            {
                "benchmark": "seed-cnn-mnist",
                "device": str(run.device),
                "cpu": cpu_name(),
                "threads": torch.get_num_threads(),
                "torch": str(torch.__version__),
                "precision": args.precision,
                "epochs": len(history),
                "batch_size": args.batch_size,
                "seconds_per_epoch_median": round(statistics.median(seconds), 2),
                "seconds_per_epoch": [round(s, 2) for s in seconds],
                "train_images_per_s": round(
                    sum(r["images_per_s"] * r["seconds"] for r in history) / sum(seconds)
                ),
                "test_accuracy": round(report.accuracy, 4),
                "best_epoch": run.checkpoint_info["epoch"],
            }
        )
    )


if __name__ == "__main__":
    main()
