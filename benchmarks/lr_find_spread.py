"""How much the range test's suggestion moves from seed to seed, and how well its
suggestion trains compared with the older minimum/10 rule and the tutorial's 1e-3.

For each seed: cnnkit's range test on a stratified MNIST subset (seed-cnn, Adam, batch
32), then a short training run at each learning rate (same seed, same subset), scored by
validation accuracy. One JSON line per seed, then a summary line.

    python benchmarks/lr_find_spread.py [--seeds 5] [--limit 2000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import cnnkit
from cnnkit.config import Config, apply_overrides
from cnnkit.device import describe
from cnnkit.train.api import plan_run
from cnnkit.train.lr_find import range_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    cpu = describe(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.seeds):
            settings = {"data": "mnist", "model": "seed-cnn", "limit": args.limit, "seed": seed}
            cfg = apply_overrides(Config(), settings)
            plan = plan_run(cfg, Path(scratch))
            found = range_test(
                plan.model, plan.data, plan.cfg, plan.ctx, plan.stages[0], quiet=True
            )
            row = {"seed": seed, "valley": found.suggestion, "minimum/10": found.minimum_lr / 10}
            row["fixed 1e-3"] = 1e-3
            accuracy = {}
            for rule in ("valley", "minimum/10", "fixed 1e-3"):
                run = cnnkit.train(
                    **settings,
                    lr=row[rule],
                    epochs=args.epochs,
                    runs_dir=scratch,
                    quiet=True,
                )
                accuracy[rule] = run.val_accuracy
            row["val_acc"] = accuracy
            rows.append(row)
            print(json.dumps(row))
    suggestions = [r["valley"] for r in rows]
    summary = {
        "cpu": cpu,
        "torch": str(torch.__version__),
        "seeds": args.seeds,
        "valley_min": min(suggestions),
        "valley_max": max(suggestions),
        "spread_factor": max(suggestions) / min(suggestions),
        "mean_val_acc": {
            rule: statistics.mean(r["val_acc"][rule] for r in rows)
            for rule in ("valley", "minimum/10", "fixed 1e-3")
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
