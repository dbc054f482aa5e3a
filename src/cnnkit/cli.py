"""The ``cnnkit`` command: argument parsing; each command's work is in commands.py."""

from __future__ import annotations

import argparse
import sys

from cnnkit import commands

# Help for every config setting; the flag is the setting's flat name (see config.resolve_key).
SETTING_HELP = {
    "data.name": "built-in data set (mnist, fashion-mnist, cifar10, cifar100), or a folder "
    "or CSV list of images (a relative one is also looked up in $CNNKIT_DATA)",
    "data.data_dir": "directory searched first for the data set's files",
    "data.val_split": "share of the training set held out for validation (default 0.1)",
    "data.limit": "train on a stratified subset of at most N images",
    "data.test_split": "share held out for testing when a folder has no test/ (default 0.1)",
    "data.augment": "augmentation: auto (none for built-ins, photo for folders), none, affine, "
    "shift, crop-flip, flip, photo",
    "data.image_size": "model input size for folder data sets (default: the backbone's, or 128)",
    "model.pretrained": "start from ImageNet weights (timm's hub cache, or the offline "
    "EfficientNet-Lite0 package)",
    "model.weights": "a local state-dict file for the backbone",
    "model.head": "extra head layers before the classifier, e.g. fc256-drop0.5",
    "finetune.freeze": "keep the pretrained backbone frozen: train the head only",
    "finetune.unfreeze": "fine-tuning unfreezes the last N blocks (default: all)",
    "finetune.finetune_epochs": "epochs of the fine-tuning stage after the head stage (default 2)",
    "finetune.finetune_lr": "fine-tuning learning rate (default: --lr / 10)",
    "finetune.layer_decay": "learning-rate factor per block towards the input (default 0.7)",
    "finetune.cache_features": "head stage on backbone features computed once (default true)",
    "train.class_weights": "none or auto (loss weights inverse to class frequency)",
    "train.sampler": "shuffle or balanced (every class drawn equally often)",
    "model.name": "model: a registered name (cnnkit models), timm:<arch>, or a layer spec "
    "such as conv32-pool-conv64-pool-drop0.25-fc64",
    "optim.optimizer": "adam, adamw or sgd (Nesterov momentum)",
    "optim.lr": "learning rate (default 1e-3)",
    "optim.momentum": "SGD momentum (default 0.9)",
    "optim.weight_decay": "weight decay, not applied to biases and norm layers",
    "optim.schedule": "learning-rate schedule: constant, onecycle, cosine",
    "optim.warmup_epochs": "linear warm-up epochs before the cosine schedule",
    "optim.label_smoothing": "label smoothing of the training loss",
    "train.epochs": "number of epochs (default 5)",
    "train.batch_size": "batch size (default 32), or auto: the largest power of two that fits "
    "the device's free memory, up to 256 on a GPU and 32 on a CPU",
    "train.seed": "random seed for the split, initialisation, shuffling, augmentation",
    "train.device": "auto, cpu, cuda, cuda:N or mps",
    "train.precision": "auto (bf16 autocast where the GPU or CPU computes in bf16 natively, "
    "else float32), fp32 or bf16",
    "train.compile": "torch.compile the model (true/false); the compiling steps' time is "
    "reported apart",
    "train.patience": "early stopping: epochs without improvement of --monitor",
    "train.monitor": "val_acc or val_loss: selects best.pt, drives early stopping",
    "train.time_budget": "stop training after this many seconds (the epoch ends early)",
    "train.eval_batch_size": "batch size for validation and evaluation",
    "run.name": "run directory name under --runs-dir (default <data>-<model>)",
    "run.runs_dir": "parent directory of runs (default runs)",
}


def _flag(key: str) -> str:
    from cnnkit.config import FLAT_ALIASES

    flat = {v: k for k, v in FLAT_ALIASES.items()}.get(key, key.split(".")[1])
    return "--" + flat.replace("_", "-")


def _add_train(sub) -> None:
    from cnnkit.config import Config, all_keys

    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train a model; flags override --config, which overrides "
        "the defaults. Example: cnnkit train --data mnist --model seed-cnn",
    )
    defaults = Config().to_dict()
    for key in all_keys():
        kwargs = {"dest": key, "default": argparse.SUPPRESS, "help": SETTING_HELP.get(key)}
        section, name = key.split(".")
        if defaults[section][name] is False:  # off by default: a plain switch turns it on
            kwargs.update(action="store_const", const="true")
        else:
            kwargs["metavar"] = key.split(".")[1].upper()
        p.add_argument(_flag(key), **kwargs)
    p.add_argument("--config", metavar="YAML", help="a recipe file of settings")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="any setting by dotted name, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    p.add_argument("--resume", metavar="RUN", help="continue the run in this directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run --name")
    p.add_argument("--quiet", action="store_true", help="print only errors and the summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnkit", description="Train, evaluate and use image classifiers."
    )
    from cnnkit import __version__

    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)

    p = sub.add_parser("evaluate", help="metrics of a run on its test or validation split")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation (shifts, and flips if training used them); "
        "prints the gain over plain evaluation",
    )

    p = sub.add_parser(
        "report",
        help="one HTML page (and JSON): curves, diagnosis, metrics, "
        "confusion, calibration, mistakes with Grad-CAM",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--split", choices=["test", "val"], help="default: test if the run has one")
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument("--gallery", type=int, default=12, help="images per gallery (default 12)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("explain", help="Grad-CAM heatmaps of image files, saved as PNG")
    p.add_argument("run", help="run directory")
    p.add_argument("files", nargs="+", help="image files")
    p.add_argument("--layer", help="convolution to explain (default: the last one)")
    p.add_argument("--out", help="output folder (default: <run>/explain)")
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument("--device", default="auto")

    p = sub.add_parser("compare", help="runs side by side: config differences and metrics")
    p.add_argument("runs", nargs="+", help="two or more run directories")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--out", default="compare.png", help="validation curves PNG")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="ONNX file verified against the model; int8 option")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", help="output file (default: <run>/model.onnx)")
    p.add_argument(
        "--layout",
        default="nchw",
        choices=["nchw", "nhwc"],
        help="input layout of the uint8 images",
    )
    p.add_argument("--quantize", choices=["int8"], help="also write a static int8 model")
    p.add_argument("--weights", default="best", choices=["best", "last"])

    p = sub.add_parser("serve", help="REST API and web page for a run or an ONNX file")
    p.add_argument("model", help="run directory or exported .onnx file")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnx"],
        help="auto: ONNX Runtime for .onnx files, PyTorch for runs",
    )
    p.add_argument(
        "--max-batch", type=int, default=32, help="images batched together at most (1: no batching)"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to batch with",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument("--max-pixels", type=int, default=40_000_000)

    p = sub.add_parser("predict", help="classify image files with a trained run or ONNX file")
    p.add_argument("run", help="run directory, checkpoint .pt, or exported .onnx")
    p.add_argument("files", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")

    p = sub.add_parser(
        "datasets",
        help="built-in data sets; check a folder of your own",
        description="list: the built-in data sets and where they are found. "
        "info NAME: shapes, classes, counts. check PATH: the data-set doctor "
        "(unreadable files, imbalance, duplicates across splits, ...).",
    )
    p.add_argument("action", nargs="?", default="list", choices=["list", "info", "check"])
    p.add_argument("name", nargs="?", help="data set name (info) or folder / CSV (check)")
    p.add_argument("--data-dir", help="directory searched first")
    p.add_argument("--json", action="store_true", help="check: the report as JSON")
    p.add_argument(
        "--near-bits",
        type=int,
        default=4,
        help="check: near duplicates differ in at most this many of 64 hash bits",
    )

    p = sub.add_parser(
        "bench",
        help="speed and accuracy of the recipes next to the peers",
        description="Runs the tutorial recipe (default settings and float32), the "
        "same recipe as typical PyTorch DataLoader code, the Keras tutorial (with "
        "--keras-python) and the fast recipes (GPU recipes too on a CUDA GPU), once per "
        "seed, interleaved; one JSON line per run, then medians and throughput ratios.",
    )
    p.add_argument(
        "--only",
        help="comma-separated: tutorial, tutorial-fp32, pytorch-dataloader, keras, "
        "mnist-fast, fashion-mnist-fast, and the GPU recipes mnist-gpu-fast, "
        "mnist-gpu-accurate, fashion-mnist-gpu (default: all; the GPU recipes only where "
        "CUDA is available)",
    )
    p.add_argument("--seeds", type=int, default=3, help="runs (seeds) per measurement (default 3)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the tutorial and peers")
    p.add_argument("--keras-python", help="a Python with TensorFlow for the Keras peer")

    p = sub.add_parser("models", help="models you can train, with parameter counts")
    p.add_argument("--spec-help", action="store_true", help="explain the layer-spec grammar")
    return parser


COMMANDS = {
    "train": commands.cmd_train,
    "evaluate": commands.cmd_evaluate,
    "report": commands.cmd_report,
    "explain": commands.cmd_explain,
    "compare": commands.cmd_compare,
    "export": commands.cmd_export,
    "serve": commands.cmd_serve,
    "predict": commands.cmd_predict,
    "datasets": commands.cmd_datasets,
    "bench": commands.cmd_bench,
    "models": commands.cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\naborted", file=sys.stderr)
        return 130
    except (
        ValueError,
        KeyError,
        FileNotFoundError,
        FileExistsError,
        RuntimeError,
        ImportError,
    ) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
