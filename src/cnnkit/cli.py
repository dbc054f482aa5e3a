"""The ``cnnkit`` command: argument parsing; each command's work is in commands/."""

from __future__ import annotations

import argparse
import os
import sys

from cnnkit import commands
from cnnkit.config import FLAT_ALIASES, setting_fields
from cnnkit.version import __version__


def _flag(key: str) -> str:
    """The train flag of a setting: its flat name (see config.resolve_key), dashed."""
    flat = {v: k for k, v in FLAT_ALIASES.items()}.get(key, key.split(".")[1])
    return "--" + flat.replace("_", "-")


def _port(text: str) -> int:
    """argparse type of --port: a TCP port number, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number: use 1-65535")
    return port


def _positive_int(text: str) -> int:
    """argparse type of a count such as --top-k: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive: use 1 or more")
    return value


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train a model; flags override --config, which overrides "
        "the defaults. Example: cnnkit train --data mnist --model seed-cnn. "
        "--lr find runs the learning-rate range test first and trains with its suggestion.",
    )
    _add_settings(p)
    p.add_argument("--resume", metavar="RUN", help="continue the run in this directory")
    p.add_argument(
        "--nproc",
        type=_positive_int,
        metavar="N",
        help="train in N processes on this machine (data-parallel: one per GPU, or CPU "
        "processes sharing the cores), started through torch's elastic launcher; the "
        "same as 'torchrun --nproc-per-node N -m cnnkit train ...'",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run --name")
    p.add_argument("--quiet", action="store_true", help="print only errors and the summary")


def _add_lr_find(sub) -> None:
    p = sub.add_parser(
        "lr-find",
        help="learning-rate range test: a plot of loss against learning rate, and a suggestion",
        description="Train from the model's initial weights for a bounded number of steps "
        "while the learning rate grows exponentially, then restore the weights. Prints "
        "'suggested lr: <value>' (the rule: docs/experiments.md). Takes train's data and "
        "model flags.",
    )
    _add_settings(p)
    p.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate (1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="last learning rate (10)")
    p.add_argument(
        "--steps", type=_positive_int, default=100, help="steps of the test (default 100)"
    )
    p.add_argument("--out", default="lr-find.png", help="the plot (default lr-find.png)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the suggestion")


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="hyperparameter search with Optuna: trials as runs, pruning, a shared study",
        description="Search a space of settings (--space, default: the tutorial's exercise "
        "space) with Optuna; every other train flag fixes a setting for all trials. Each "
        "trial is a run under <runs-dir>/<study>/. Started again with the same --study and "
        "--storage it continues the study; started on several machines with one database "
        "URL, the workers share it.",
    )
    _add_settings(p)
    p.add_argument("--space", metavar="YAML", help="search space (default: the shipped one)")
    p.add_argument(
        "--trials",
        type=_positive_int,
        default=20,
        help="finished trials the study should have, counted over all workers (default 20)",
    )
    p.add_argument("--study", metavar="NAME", help="study name (default tune-<data>-<model>)")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna RDB storage (default sqlite:///<runs-dir>/optuna.db); a postgresql:// or "
        "mysql:// URL lets workers on several machines share the study",
    )
    p.add_argument(
        "--pruner",
        default="median",
        choices=["median", "hyperband", "none"],
        help="stops a trial whose validation accuracy lags after an epoch (default median)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="start no new trial after this many seconds (this worker)",
    )
    p.add_argument("--json", action="store_true", help="print the trials as JSON")
    p.add_argument("--quiet", action="store_true", help="no training output; one line per trial")


def _add_audit_options(p, prefix: str = "") -> None:
    p.add_argument(
        "--model",
        help=f"{prefix}the model that cross-validates (default: seed-cnn from scratch for "
        "built-in sets; efficientnet_lite0's ImageNet features for folders of photos)",
    )
    p.add_argument(
        "--pretrained", action="store_true", help=f"{prefix}use --model's ImageNet features"
    )
    p.add_argument("--folds", type=_positive_int, default=5, help=f"{prefix}folds (default 5)")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        help=f"{prefix}epochs per fold from scratch (default 3); L-BFGS steps on features (100)",
    )
    p.add_argument("--limit", type=_positive_int, help=f"{prefix}a stratified subset of N images")
    p.add_argument(
        "--method",
        default="self_confidence",
        choices=["self_confidence", "prune_by_noise_rate"],
        help=f"{prefix}which images confident learning lists (default self_confidence)",
    )
    p.add_argument("--top", type=_positive_int, default=20, help=f"{prefix}rows shown (20)")
    p.add_argument("--audit-out", metavar="DIR", help=f"{prefix}folder of audit.csv/json/html")


def _add_settings(p) -> None:
    """A flag per training setting, plus --config and --set (train, lr-find, tune)."""
    # One flag per setting, documented by the setting itself (config.py). The choices are
    # shown, not enforced here: validating the Config gives the same one-line error for
    # flags, --set and recipes alike.
    for key, setting_field in setting_fields().items():
        kwargs = {"dest": key, "default": argparse.SUPPRESS, "help": setting_field.metadata["help"]}
        choices = setting_field.metadata["choices"]
        if setting_field.default is False:  # off by default: a plain switch turns it on
            kwargs.update(action="store_const", const="true")
        elif choices is not None:
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnkit", description="Train, evaluate and use image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_lr_find(sub)
    _add_tune(sub)

    p = sub.add_parser("evaluate", help="metrics of a run on its test or validation split")
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--split",
        default=None,
        choices=["test", "val", "train"],
        help="default: test if the run has one, else val (with a caveat: it selected best.pt)",
    )
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation (shifts, and flips if training used them); "
        "prints the gain over plain evaluation",
    )
    p.add_argument(
        "--ood",
        metavar="DATA",
        help="out-of-distribution check: a built-in set or folder of images of none of the "
        "run's classes; prints AUROC and FPR at 95%% TPR of each score against the split "
        "(saved as eval-ood-<name>.json)",
    )
    p.add_argument(
        "--ood-limit", type=_positive_int, metavar="N", help="--ood: a random N of its images"
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
    p.add_argument(
        "--layer",
        help="convolution to explain (default: the last one; with --feature-maps the first)",
    )
    p.add_argument(
        "--feature-maps",
        action="store_true",
        help="instead of Grad-CAM: what the layer outputs for each image, one tile per "
        "channel (<name>-features.png)",
    )
    p.add_argument("--out", help="output folder (default: <run>/explain)")
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument("--device", default="auto")

    p = sub.add_parser("compare", help="runs side by side: config differences and metrics")
    p.add_argument("runs", nargs="*", help="two or more run directories")
    p.add_argument(
        "--mlflow",
        metavar="EXPERIMENT",
        help="compare the runs of this MLflow experiment instead (from the tracking store: "
        "--mlflow-uri, $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db)",
    )
    p.add_argument("--mlflow-uri", metavar="URI", help="the MLflow tracking store to read")
    p.add_argument("--split", default=None, choices=["test", "val"], help="default: test, else val")
    p.add_argument("--out", default="compare.png", help="validation curves PNG")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "export",
        help="a file verified against the model for ONNX Runtime, a phone (ONNX Runtime "
        "Mobile, ExecuTorch, Core ML) or the browser (a web app); int8 option",
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "webapp", "ort", "executorch", "coreml", "triton"],
        help="onnx: one .onnx file; webapp: a folder that classifies in the browser, offline; "
        "ort: ONNX Runtime Mobile (.ort); executorch: ExecuTorch (.pte, XNNPACK); coreml: "
        "Core ML (.mlpackage); triton: an NVIDIA Triton model repository folder "
        "(default: <run>/triton)",
    )
    p.add_argument(
        "--out",
        "--output",
        help="output file (default: <run>/model.<format's suffix>); for webapp a folder "
        "(default: <run>/webapp)",
    )
    p.add_argument(
        "--layout",
        default="nchw",
        choices=["nchw", "nhwc"],
        help="input layout of the uint8 images",
    )
    p.add_argument("--quantize", choices=["int8"], help="also write a static int8 model")
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument(
        "--reject",
        default="on",
        choices=["on", "off"],
        help="on (default): the file carries the run's 'unknown' threshold (ONNX: and an "
        "'ood_score' output); off: without them",
    )

    p = sub.add_parser("serve", help="REST API and web page for a run or an ONNX file")
    p.add_argument("model", help="run directory or exported .onnx file")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (default 8000)")
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
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="per image")
    # The defaults are the service's own (deploy/serve.py); None leaves them to it.
    p.add_argument(
        "--max-request-pixels", type=int, help="all images of one request (default 100M)"
    )
    p.add_argument("--decode-threads", type=int, help="images decoded at once (default: 4)")
    p.add_argument(
        "--upload-timeout", type=float, help="seconds a body may take to arrive (default 30)"
    )
    p.add_argument(
        "--header-timeout", type=float, help="seconds the headers may take to arrive (default 10)"
    )
    p.add_argument(
        "--max-queue",
        type=_positive_int,
        help="images waiting at most before requests are answered 503 with Retry-After "
        "(default: 4 x --max-batch)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="server processes sharing the port, each with the model loaded once (default 1)",
    )
    p.add_argument(
        "--reject",
        default="on",
        choices=["on", "off"],
        help="on (default): images below the model's out-of-distribution threshold are "
        "answered 'unknown'; off: always the most probable class",
    )

    p = sub.add_parser("predict", help="classify image files with a trained run or ONNX file")
    p.add_argument("run", help="run directory, checkpoint .pt, or exported .onnx")
    p.add_argument(
        "files",
        nargs="+",
        help="image files (PNG, JPEG, ...) or folders (every image file under them, sorted)",
    )
    p.add_argument(
        "--top-k", type=_positive_int, default=3, help="classes shown per image (default 3)"
    )
    p.add_argument(
        "--output",
        metavar="FILE.csv|FILE.json",
        help="also write every prediction to this file: CSV (a row per image) or JSON",
    )
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument(
        "--reject",
        default="on",
        choices=["on", "off"],
        help="on (default): images below the run's out-of-distribution threshold are "
        "answered 'unknown'; off: always the most probable class",
    )

    p = sub.add_parser(
        "datasets",
        help="built-in data sets; check a folder of your own; pack one into shards",
        description="list: the built-in data sets and where they are found. "
        "info NAME: shapes, classes, counts. check PATH: the data-set doctor "
        "(unreadable files, imbalance, duplicates across splits, ...). audit DATA: likely "
        "label errors, by cross-validation and confident learning "
        "pack SRC OUT: write a built-in set, folder or CSV list as WebDataset tar shards "
        "(train-000000.tar, ..., and index.json) for data bigger than memory; the split is "
        "made once, as training makes it, and unreadable files are reported and left out.",
    )
    p.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=["list", "info", "check", "pack", "audit", "preview"],
    )
    p.add_argument("name", nargs="?", help="data set name (info), folder / CSV (check), SRC (pack)")
    p.add_argument("out", nargs="?", metavar="OUT", help="pack: the folder to write shards to")
    p.add_argument("--data-dir", help="directory searched first")
    p.add_argument("--json", action="store_true", help="check, pack: the report as JSON")
    p.add_argument(
        "--shard-size",
        default="256MB",
        help="pack: the most bytes per shard: 500MB, 1GB, 200000000 (default 256MB)",
    )
    p.add_argument("--max-count", type=int, help="pack: the most images per shard")
    _add_audit_options(p, "audit: ")
    p.add_argument(
        "--max-side",
        type=int,
        help="pack: downsize images whose longer side is larger than this, re-encoded "
        "(JPEG; PNG for grayscale); others keep their bytes",
    )
    p.add_argument(
        "--quality",
        type=int,
        help="pack: JPEG quality when re-encoding (default 90); given, every image is re-encoded",
    )
    p.add_argument(
        "--val-split", type=float, default=0.1, help="pack: validation share (default 0.1)"
    )
    p.add_argument(
        "--test-split",
        type=float,
        default=0.1,
        help="pack: test share of a folder without test/ (default 0.1; built-in sets keep "
        "their official test set)",
    )
    p.add_argument("--seed", type=int, default=0, help="pack: split and shuffle seed")
    p.add_argument("--overwrite", action="store_true", help="pack: replace the set in OUT")
    p.add_argument(
        "--near-bits",
        type=int,
        default=4,
        help="check: near duplicates differ in at most this many of 64 hash bits",
    )
    p.add_argument(
        "--augment",
        default="affine",
        choices=["none", "affine", "shift", "crop-flip", "flip", "photo"],
        help="preview: the augmentation preset to show (default affine)",
    )
    p.add_argument(
        "--views",
        type=_positive_int,
        default=7,
        help="preview: augmented views per image, beside the original (default 7)",
    )
    p.add_argument("--out", help="preview: the PNG to write (default augment-<preset>.png, here)")

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

    p = sub.add_parser(
        "cache",
        help="cnnkit's cache folders: their size, and clearing them",
        description="list: each cache folder under $XDG_CACHE_HOME/cnnkit (~/.cache/cnnkit) "
        "with its size and entries. clear [NAME ...]: delete decoded (the decoded images of "
        "folder data sets, one entry per image size; rebuilt on the next run), datasets "
        "(downloaded built-in data sets; downloaded again when needed) and/or shards "
        "(folders packed for --stream; packed again when needed); default all.",
    )
    p.add_argument("action", nargs="?", default="list", choices=["list", "clear"])
    p.add_argument("names", nargs="*", metavar="NAME", help="clear: decoded, datasets, shards")
    p.add_argument("--yes", action="store_true", help="clear without asking")
    p.add_argument("--json", action="store_true", help="list: as JSON")

    p = sub.add_parser(
        "audit",
        help="likely label errors in a run's data (cross-validation + confident learning)",
        description="Audit the labels of the data a run was trained on, with the run's "
        "model settings: out-of-sample probabilities by k-fold cross-validation, then "
        "confident learning. Writes <run>/audit/audit.csv, audit.json and audit.html.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="print the audit as JSON")
    _add_audit_options(p)

    p = sub.add_parser(
        "models",
        help="models you can train, with parameter counts",
        description="Without NAME: the registered models. With NAME (a registered name, a "
        "timm architecture or a layer spec): its layers, the shape each outputs and their "
        "parameters for --input. Example: cnnkit models seed-cnn --input 1x28x28",
    )
    p.add_argument("name", nargs="?", help="a model to show layer by layer")
    p.add_argument(
        "--input",
        default="1x28x28",
        metavar="CxHxW",
        help="input shape for the layer table (default 1x28x28, MNIST)",
    )
    p.add_argument("--classes", type=_positive_int, default=10, help="outputs (default 10)")
    p.add_argument("--spec-help", action="store_true", help="explain the layer-spec grammar")
    return parser


COMMANDS = {
    "train": commands.cmd_train,
    "lr-find": commands.cmd_lr_find,
    "tune": commands.cmd_tune,
    "evaluate": commands.cmd_evaluate,
    "report": commands.cmd_report,
    "explain": commands.cmd_explain,
    "compare": commands.cmd_compare,
    "export": commands.cmd_export,
    "serve": commands.cmd_serve,
    "predict": commands.cmd_predict,
    "datasets": commands.cmd_datasets,
    "audit": commands.cmd_audit,
    "bench": commands.cmd_bench,
    "models": commands.cmd_models,
    "cache": commands.cmd_cache,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc passes on
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
        OSError,  # a read-only or full disk: PermissionError, ENOSPC, ...
        RuntimeError,
        ImportError,
    ) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        rank = int(os.environ.get("RANK", "0"))  # a torchrun worker's rank
        if rank and _said_by_rank_0(e):
            return 1  # N copies of one line would only bury it
        print(f"error: {f'rank {rank}: ' if rank else ''}{message}", file=sys.stderr)
        return 1


def _said_by_rank_0(error: Exception) -> bool:
    """Errors every worker meets alike, which rank 0 reports: rank 0's own failure passed
    on, and errors before the process group (the settings, read alike by all)."""
    from cnnkit.train import distributed

    return isinstance(error, distributed.MainRankFailed) or not distributed.ever_joined()


if __name__ == "__main__":
    sys.exit(main())
