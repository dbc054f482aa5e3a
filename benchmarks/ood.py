"""Out-of-distribution images, measured: the tutorial CNN on MNIST against Fashion-MNIST,
and EfficientNet-Lite0 fine-tuned on cats vs dogs against MNIST digits and Fashion-MNIST
items made into RGB photos. For each score (max softmax, energy): AUROC, and at the
threshold that keeps 95% of the run's own test (or validation) images, the share of the
other images accepted and rejected; and the share of each set that the run's stored
threshold (fitted on validation) answers "unknown". One JSON line per pair.

    python benchmarks/ood.py [--limit 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

import cnnkit
from cnnkit.device import describe
from cnnkit.runs.ood import evaluate_ood


def cats_dogs() -> str | None:
    for root in os.environ.get("CNNKIT_DATA", "").split(os.pathsep):
        if root and (Path(root) / "cats_vs_dogs" / "train").is_dir():
            return str(Path(root) / "cats_vs_dogs")
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=5000, help="out-of-distribution images each")
    args = p.parse_args()
    cpu = describe(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as runs:
        pairs = []
        mnist = cnnkit.train(
            data="mnist", model="seed-cnn", epochs=5, runs_dir=runs, name="mnist", quiet=True
        )
        pairs.append((mnist, "seed-cnn 5 epochs", ["fashion-mnist"]))
        if cats_dogs():
            cats = cnnkit.train(
                data=cats_dogs(),
                model="efficientnet_lite0",
                pretrained=True,
                epochs=3,
                finetune_epochs=1,
                runs_dir=runs,
                name="cats",
                quiet=True,
            )
            pairs.append(
                (cats, "efficientnet_lite0 ImageNet, 3+1 epochs", ["mnist", "fashion-mnist"])
            )
        for run, model, others in pairs:
            for other in others:
                result = evaluate_ood(run, other, limit=args.limit)
                record = {
                    "benchmark": "ood",
                    "model": model,
                    **{k: result[k] for k in ("in_distribution", "out_of_distribution")},
                    "calibrated": bool((run.calibration or {}).get("applied")),
                    "scores": {
                        name: {k: round(v, 4) for k, v in m.items()}
                        for name, m in result["scores"].items()
                    },
                    # the threshold stored in the run, fitted on its validation split: the
                    # share of each set that predict/serve/exports answer "unknown"
                    "stored_rule": {
                        k: round(v, 4) if isinstance(v, float) else v
                        for k, v in result.get("stored_rule", {}).items()
                    },
                    "cpu": cpu,
                }
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
