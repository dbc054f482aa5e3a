"""Multi-label, measured: canvases of one or two MNIST digits (56x56; the labels are the
digits present; 1 in 20 holds none), made deterministically from the official MNIST files
(training canvases from its training digits, test canvases from its test digits), then the
tutorial CNN trained on them with cnnkit's defaults. Prints one JSON line: mAP (macro and
micro), example F1, Hamming loss and subset accuracy on the test canvases, at the
per-label thresholds fitted on validation, and the training time; then the same with
test-time augmentation (``tta_*``), and the int8 ONNX file's mAP, example F1 and share of
identical label sets beside the float file's on the validation canvases (``int8``).

    CNNKIT_DATA=../shared/data python benchmarks/multilabel.py [--train 6000] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import cnnkit
from cnnkit.data.canvases import write_digit_canvases, write_photo_canvases
from cnnkit.deploy.export import export_onnx
from cnnkit.device import describe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=6000, help="training canvases (10%% held out)")
    p.add_argument("--test", type=int, default=2000, help="test canvases")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--model", default="seed-cnn")
    p.add_argument(
        "--photos",
        metavar="CATS_VS_DOGS",
        help="instead: canvases of a cat, a dog or both from this folder, and EfficientNet-"
        "Lite0 (ImageNet weights) trained 3 epochs on cached features and 1 fine-tuning",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.photos:
            listing = write_photo_canvases(Path(tmp) / "canvases", Path(args.photos))
            settings = {"model": "efficientnet_lite0", "pretrained": True, "epochs": 3}
            settings["finetune_epochs"] = 1
        else:
            listing = write_digit_canvases(Path(tmp) / "canvases", args.train, args.test)
            settings = {"model": args.model, "epochs": args.epochs}
        t0 = time.perf_counter()
        run = cnnkit.train(
            data=str(listing), runs_dir=str(Path(tmp) / "runs"), quiet=True, **settings
        )
        seconds = time.perf_counter() - t0
        report = run.evaluate(split="test", save=False).metrics
        tta = run.evaluate(split="test", save=False, tta=True).metrics
        int8 = export_onnx(run, Path(tmp) / "m.onnx", quantize="int8").int8
        data = run.data()
        trained = len(data.train) + len(data.val)
    print(
        json.dumps(
            {
                "benchmark": "multilabel-" + ("photos" if args.photos else "digits"),
                **settings,
                "train_canvases": trained,
                "test_canvases": report["num_images"],
                **{
                    k: round(report[k], 4)
                    for k in ("mAP", "mAP_micro", "example_f1", "hamming_loss", "subset_accuracy")
                },
                "tta_mAP": round(tta["mAP"], 4),
                "tta_example_f1": round(tta["example_f1"], 4),
                "int8": {
                    k: v if k == "images" else round(v, 4)
                    for k, v in int8.items()
                    if k not in ("images_per_s", "size_bytes")
                },
                "train_seconds": round(seconds, 1),
                "cpu": describe(torch.device("cpu")),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
