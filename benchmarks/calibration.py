"""Temperature scaling, measured: ECE before and after on the validation split (where T is
fitted) and on the test split (never seen), for the tutorial CNN on MNIST and a pretrained
EfficientNet-Lite0 fine-tuned on the cats-vs-dogs photos. One JSON line per model.

    python benchmarks/calibration.py [--sets mnist cats_vs_dogs]
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
from cnnkit.evaluate.metrics import calibration

RECIPES = {
    "mnist": dict(data="mnist", model="seed-cnn", epochs=5),
    "cats_vs_dogs": dict(model="efficientnet_lite0", pretrained=True, epochs=3, finetune_epochs=1),
}


def cats_dogs() -> str | None:
    for root in os.environ.get("CNNKIT_DATA", "").split(os.pathsep):
        if root and (Path(root) / "cats_vs_dogs" / "train").is_dir():
            return str(Path(root) / "cats_vs_dogs")
    return None


def measure(name: str, settings: dict, runs: str) -> dict:
    run = cnnkit.train(**settings, runs_dir=runs, name=name, quiet=True)
    record = run.calibration or {}
    t = record.get("temperature", 1.0) if record.get("applied") else 1.0
    data = run.data()
    split = "test" if data.count("test") else "val"
    outputs = run.split_outputs(data, split, progress_label=f"{name}: {split}")
    labels = outputs.labels.cpu()
    after = calibration(outputs.logits.softmax(1).cpu(), labels)["ece"]
    before = calibration((outputs.logits * t).softmax(1).cpu(), labels)["ece"]
    return {
        "benchmark": "calibration",
        "data": name,
        "settings": {k: v for k, v in settings.items() if k != "data"},
        "temperature": round(t, 4),
        "folded_in": bool(record.get("applied")),
        "val_images": record.get("images"),
        "val_ece": [round(record.get("ece_before", 0), 4), round(record.get("ece_after", 0), 4)],
        "val_nll": [round(record.get("nll_before", 0), 4), round(record.get("nll_after", 0), 4)],
        f"{split}_images": len(labels),
        f"{split}_ece": [round(before, 4), round(after, 4)],
        f"{split}_accuracy": round(
            float((outputs.logits.argmax(1).cpu() == labels).float().mean()), 4
        ),
        "cpu": describe(torch.device("cpu")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(RECIPES))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        for name in args.sets:
            settings = dict(RECIPES[name])
            if name == "cats_vs_dogs":
                if not cats_dogs():
                    print(json.dumps({"benchmark": "calibration", "data": name, "skipped": 1}))
                    continue
                settings["data"] = cats_dogs()
            print(json.dumps(measure(name, settings, runs)), flush=True)


if __name__ == "__main__":
    main()
