"""What each ``cnnkit`` command does: call the API, print the result. Parsing is in cli.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _without_nproc(argv: list[str]) -> list[str]:
    """The train command line with --nproc N (or --nproc=N, or an abbreviation argparse
    took for it, such as --np) taken out: the workers' one."""
    out, skip = [], False
    for arg in argv:
        flag = arg.split("=", 1)[0]
        is_nproc = len(flag) > 3 and "--nproc".startswith(flag)
        if skip:
            skip = False
        elif is_nproc:
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def _launch_workers(args, settings: dict) -> int:
    """``cnnkit train --nproc N``: the same command in N worker processes."""
    from cnnkit.train import distributed

    if distributed.launched():
        raise ValueError(
            "--nproc starts its own worker processes; under torchrun leave it out "
            "(torchrun's --nproc-per-node says how many)"
        )
    # (each worker checks its device: one GPU per process, CUDA or the CPU)
    code, message = distributed.launch(args.nproc, _without_nproc(args.argv))
    if message:
        print(f"{'error: ' if code != 130 else ''}{message}", file=sys.stderr)
    return code


def _lost_contact(error: RuntimeError) -> RuntimeError | None:
    """A clear error for a collective that failed because another worker stopped."""
    from cnnkit.train import distributed

    if not distributed.launched() or not distributed.lost_contact(error):
        return None
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RuntimeError(
        f"lost contact with the other training processes (one stopped, failed or timed "
        f"out; CNNKIT_DIST_TIMEOUT bounds the wait): {first}"
    )


def _settings(args) -> dict:
    """The settings given as flags and --set KEY=VALUE, as dotted keys."""
    settings = {k: v for k, v in vars(args).items() if "." in k}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        settings[key.strip()] = value.strip()
    return settings


def _config(args, settings: dict):
    """The Config of train, lr-find and tune: the defaults, then --config, then the flags."""
    from cnnkit.config import Config, apply_overrides, load_config

    recipe = load_config(args.config) if args.config else {}
    return apply_overrides(apply_overrides(Config(), recipe), settings)


def cmd_train(args) -> int:
    import cnnkit
    from cnnkit.train.loop import TrainingInterrupted

    settings = _settings(args)
    if args.nproc and args.nproc > 1:
        return _launch_workers(args, settings)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if args.resume:
            if args.config:
                raise ValueError("--config cannot be combined with --resume")
            run = cnnkit.resume(args.resume, quiet=args.quiet, **settings)
        else:
            find = str(settings.get("optim.lr", "")).lower() == "find"
            if find:  # the range test picks it (train() records the value in config.yaml)
                settings.pop("optim.lr")
            cfg = _config(args, settings)
            lr = {"lr": "find"} if find else {}
            run = cnnkit.train(cfg, overwrite=args.overwrite, quiet=args.quiet, **lr)
    except RuntimeError as e:
        raise _lost_contact(e) or e from None
    except TrainingInterrupted as e:
        if rank:  # rank 0 says it
            return 130
        run_dir = e.checkpoint.parent
        workers = int(os.environ.get("WORLD_SIZE", "1"))
        on_one_machine = workers == int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        how = f" --nproc {workers}" if workers > 1 and on_one_machine else ""
        print(
            f"\nInterrupted at epoch {e.epoch + 1}, step {e.step}/{e.steps}. "
            f"Saved {e.checkpoint}.\nResume with: cnnkit train --resume {run_dir}{how}",
            file=sys.stderr,
        )
        return 130
    if rank:  # rank 0 reports
        return 0
    if args.quiet:  # scripts still learn where the run is and how it ended
        last = run.history[-1]
        val = f"val acc {last['val_acc']:.4f}" if last["val_acc"] is not None else "no val"
        print(f"{run.path}: {len(run.history)} epochs, {val}")
    if args.resume:  # a new best.pt leaves the old report, evaluations and export behind
        for output in run.stale_outputs():
            print(f"stale  {output.describe()}\n       rebuild: {output.rebuild}")
    return 0


def cmd_lr_find(args) -> int:
    from cnnkit.train.api import lr_find

    result = lr_find(
        _config(args, _settings(args)),
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        steps=args.steps,
        plot=args.out,
        quiet=args.quiet or args.json,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if not args.quiet:
        print(result.describe())
        print(f"plot   {args.out}")
    print(f"suggested lr: {result.suggestion:.3g}")
    return 0


def cmd_tune(args) -> int:
    from cnnkit.tune import run_tune_command

    return run_tune_command(args, _config(args, _settings(args)))


def _table(title: str | None, *columns: str, text_columns: int = 1):
    """A rich table whose first ``text_columns`` columns are left-aligned, the rest numbers.

    Its title, headers and string cells are plain text, never rich markup: they hold class
    names and paths, and a class named ``[red]cat`` must print as itself.
    """
    from rich.table import Table
    from rich.text import Text

    class PlainTextTable(Table):
        def add_row(self, *renderables, **kwargs) -> None:
            cells = [Text(r) if isinstance(r, str) else r for r in renderables]
            super().add_row(*cells, **kwargs)

    t = PlainTextTable(
        title=Text(title) if title is not None else None,
        title_justify="left",
        header_style="bold",
    )
    for i, c in enumerate(columns):
        # fold, never elide: a path or class name cut to "..." is information lost
        t.add_column(Text(c), justify="left" if i < text_columns else "right", overflow="fold")
    return t


# Width of the output when it goes to a pipe or file: wide enough that no line is folded.
PIPED_WIDTH = 10_000


def _console():
    import os

    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped or redirected: there is no screen to fit, and a path folded mid-word at
        # rich's default 80 columns breaks grep and copy-paste.
        console = Console(highlight=False, soft_wrap=True, width=PIPED_WIDTH)
    return console


# What `pip install 'cnnkit[deploy]'` brings (pyproject.toml); the core runs without it.
DEPLOY_MODULES = (
    "fastapi",
    "uvicorn",
    "prometheus_client",
    "python_multipart",
    "onnx",
    "onnxruntime",
    "onnxscript",
)


def _require_deploy_extras(command: str, *modules: str) -> None:
    """Import ``modules`` now, so a missing deploy extra is one line naming the install
    command, before a run is loaded or a file written, instead of "No module named ..."."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if (e.name or module).split(".")[0] not in DEPLOY_MODULES:
                raise  # something else is broken: its own message says what
            raise ImportError(
                f"cnnkit {command} needs {e.name or module}, which is not installed: "
                "pip install 'cnnkit[deploy]'"
            ) from None


def _require_extra(command: str, module: str, extra: str) -> None:
    """One line naming the install command when an optional package is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"cnnkit {command} needs {module}, which is not installed: "
            f"pip install 'cnnkit[{extra}]'"
        )


def _check_writable(folder: Path, hint: str) -> None:
    """Fail before any work when nothing can be written in ``folder`` (made if missing).

    A probe file, not os.access: access() says yes to root on a read-only mount.
    """
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {folder} ({e.strerror or e}); {hint}") from None


def _say_rebuilding(run, output: str, stream) -> None:
    """Say so when the ``output`` file about to be rewritten was made from other weights."""
    for stale in run.stale_outputs():
        if stale.files[0].name == output:
            print(f"rebuilding a stale output: {stale.describe()}", file=stream)


def cmd_evaluate(args) -> int:
    from rich.markup import escape

    import cnnkit

    run = cnnkit.load_run(args.run, weights=args.weights, device=args.device)
    _check_writable(
        run.path,
        "evaluate saves eval-<split>.json, confusion_matrix.png and curves.png in the run; "
        "copy the run somewhere writable",
    )
    if args.ood:
        return _evaluate_ood(run, args)
    choice = run.choose_split(args.split)  # None: test if the run has one, else val
    _say_rebuilding(run, f"eval-{choice.split}.json", sys.stderr)  # stdout: --json
    report = run.evaluate(split=args.split)  # None again: the saved reason is the same one
    if args.tta:
        plain, report = report, run.evaluate(split=args.split, tta=True, save=False)
    if args.json:
        print(json.dumps({**report.to_dict(), "split_choice": choice.to_dict()}, indent=2))
        return 0
    con = _console()
    epoch = run.checkpoint_info["epoch"]
    con.print(
        f"[bold]{escape(str(run.path))}[/]: {escape(run.config.model.name)} on "
        f"{escape(run.config.data.name)}, "
        f"{args.weights}.pt (epoch {epoch}), {report.split} split ({choice.reason}), "
        f"{report.num_images:,} images"
    )
    if choice.caveat:
        con.print(f"[yellow]caveat[/] {escape(choice.caveat)}")
    topk = "  ".join(f"top-{k} {v:.2%}" for k, v in report.top_k.items() if k > 1)
    con.print(f"accuracy [bold]{report.accuracy:.2%}[/]  {topk}  loss {report.loss:.4f}")
    t = _table(None, "class", "precision", "recall", "f1", "support")
    pc = report.per_class
    for i, name in enumerate(report.classes):
        t.add_row(
            name,
            f"{pc['precision'][i]:.4f}",
            f"{pc['recall'][i]:.4f}",
            f"{pc['f1'][i]:.4f}",
            f"{pc['support'][i]:,}",
        )
    t.add_section()
    for label, avg in (("macro avg", report.macro), ("weighted avg", report.weighted)):
        t.add_row(
            label,
            f"{avg['precision']:.4f}",
            f"{avg['recall']:.4f}",
            f"{avg['f1']:.4f}",
            f"{report.num_images:,}",
        )
    con.print(t)
    if args.tta:
        con.print(
            f"test-time augmentation: accuracy {report.accuracy:.2%} vs {plain.accuracy:.2%}"
            f" plain, a gain of {(report.accuracy - plain.accuracy) * 100:+.2f} points "
            "(the tables show the TTA numbers)"
        )
    for warning in report.warnings:
        con.print(f"[yellow]warning[/] {escape(warning)}")
    if len(report.classes) <= 20:
        cm = _table(
            "confusion matrix (rows: true class, columns: predicted)",
            "true \\ pred",
            *report.classes,
        )
        for name, row in zip(report.classes, report.confusion_matrix, strict=True):
            cm.add_row(name, *(str(v) for v in row))
        con.print(cm)
    con.print(
        f"saved {run.path / f'eval-{report.split}.json'}, "
        f"{run.path / 'confusion_matrix.png'}, {run.path / 'curves.png'}"
    )
    return 0


def _evaluate_ood(run, args) -> int:
    """evaluate --ood DATA: each score's separation of the run's split from DATA."""
    from cnnkit.runs.ood import evaluate_ood

    result = evaluate_ood(run, args.ood, split=args.split, limit=args.ood_limit)
    name = Path(args.ood).name or "ood"
    (run.path / f"eval-ood-{name}.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    inside, outside = result["in_distribution"], result["out_of_distribution"]
    t = _table(
        f"{inside['data']} {inside['split']} ({inside['images']:,} images) against "
        f"{outside['data']} ({outside['images']:,}); threshold keeps 95% of the first",
        "score",
        "AUROC",
        "FPR at 95% TPR",
        "out-of-distribution rejected",
    )
    for score, m in result["scores"].items():
        t.add_row(
            score, f"{m['auroc']:.4f}", f"{m['fpr_at_95_tpr']:.2%}", f"{m['out_rejected']:.2%}"
        )
    _console().print(t)
    print(f"wrote {run.path / f'eval-ood-{name}.json'}")
    return 0


def cmd_report(args) -> int:
    import cnnkit

    run = cnnkit.load_run(args.run, weights=args.weights, device=args.device)
    _say_rebuilding(run, "report.json", sys.stdout)
    html_path, json_path = run.report(split=args.split, gallery=args.gallery)
    report = json.loads(json_path.read_text())
    m = report["metrics"]
    print(f"{report['split']} split: {report['split_reason']}")
    if report["caveat"]:
        print(f"caveat: {report['caveat']}")
    print(
        f"{report['split']} accuracy {m['accuracy']:.2%}, macro F1 {m['macro_avg']['f1']:.4f}, "
        f"ECE {report['calibration']['ece']:.4f}; diagnosis: "
        + ", ".join(v["verdict"] for v in report["diagnosis"])
    )
    print(f"wrote {html_path} and {json_path}")
    _log_to_mlflow(run.path, [html_path, json_path])
    return 0


def _log_to_mlflow(run_dir: Path, files: list[Path], folder: str | None = None) -> None:
    """Files made after training go to the run's MLflow run too, when it was tracked."""
    from cnnkit.train.tracking import log_outputs

    line = log_outputs(run_dir, files, folder)
    if line:
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)


def cmd_explain(args) -> int:
    import cnnkit
    from cnnkit.evaluate.explain import viewable

    run = cnnkit.load_run(args.run, weights=args.weights, device=args.device)
    out = Path(args.out) if args.out else run.path / "explain"
    out.mkdir(parents=True, exist_ok=True)
    failed, used = 0, set()
    for path, (pred, image) in zip(
        args.files, run.explain(args.files, layer=args.layer), strict=True
    ):
        if pred.error:
            print(f"error: {pred.error}", file=sys.stderr)
            failed += 1
            continue
        name, i = Path(path).stem, 2
        while name in used:  # a/1.png and b/1.png: 1-gradcam.png and 1-2-gradcam.png
            name, i = f"{Path(path).stem}-{i}", i + 1
        used.add(name)
        target = out / f"{name}-gradcam.png"
        viewable(image).save(target)
        print(f"{pred.source}: {pred.label} {pred.top[0][1]:.1%} -> {target}")
    return 1 if failed else 0


def _compare_mlflow(args) -> int:
    from cnnkit.train.tracking import compare_experiment

    if args.runs:
        raise ValueError("compare takes run directories or --mlflow EXPERIMENT, not both")
    _require_extra("compare --mlflow", "mlflow", "track")
    result = compare_experiment(args.mlflow, args.mlflow_uri)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    differing = list(result["differences"])
    t = _table(
        f"MLflow experiment '{result['experiment']}' at {result['tracking_uri']} "
        "(* best by validation accuracy)",
        "run",
        "status",
        *differing,
        "val acc",
        "epochs",
        "train time",
        text_columns=2 + len(differing),
    )
    for i, r in enumerate(result["runs"]):
        mark = " *" if r["run"] == result["best"] else ""
        t.add_row(
            r["run"] + mark,
            r["status"],
            *(str(result["differences"][k][i]) for k in differing),
            f"{r['val_accuracy']:.2%}" if r["val_accuracy"] is not None else "-",
            str(r["epochs"]),
            f"{r['training_seconds']:.1f}s",
        )
    _console().print(t)
    return 0


def cmd_compare(args) -> int:
    from cnnkit.runs.compare import compare_runs

    if args.mlflow:
        return _compare_mlflow(args)
    if len(args.runs) < 2:
        raise ValueError("compare needs two or more run directories, or --mlflow EXPERIMENT")
    result = compare_runs(args.runs, split=args.split, plot=args.out)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    con = _console()
    if result["differences"]:
        t = _table(
            "settings that differ",
            "setting",
            *[Path(r).name for r in args.runs],
            text_columns=1 + len(args.runs),
        )
        for key, values in result["differences"].items():
            t.add_row(key, *(str(v) for v in values))
        con.print(t)
    t = _table(
        f"results (* best by validation accuracy, the column that ranks; "
        f"{result['split']} split shown beside it)",
        "run",
        "val acc (ranks)",
        f"{result['split']} accuracy",
        f"{result['split']} macro F1",
        "parameters",
        "train time",
        "images/s",
        "epochs",
    )
    for r in result["runs"]:
        mark = " *" if r["run"] == result["best"] else ""
        t.add_row(
            Path(r["run"]).name + mark,
            f"{r['val_accuracy']:.2%}" if r["val_accuracy"] is not None else "-",
            f"{r['accuracy']:.2%}",
            f"{r['macro_f1']:.4f}",
            f"{r['parameters']:,}",
            f"{r['training_seconds']:.1f}s",
            f"{r['images_per_s']:,.0f}" if r["images_per_s"] else "-",
            str(r["epochs"]),
        )
    con.print(t)
    con.print(result["ranking"])
    if "plot" in result:
        con.print(f"validation curves: {result['plot']}")
    return 0


def cmd_export(args) -> int:
    import cnnkit

    _require_deploy_extras("export", "onnx", "onnxruntime", "onnxscript")
    if args.format == "webapp":
        return _export_webapp(args)
    if args.format == "triton":
        return _export_triton(args)
    if args.format != "onnx":
        return _export_mobile(args)
    from cnnkit.deploy.export import export_onnx

    run = cnnkit.load_run(args.run, weights=args.weights, device="cpu")
    out = Path(args.out) if args.out else run.path / "model.onnx"
    _check_writable(out.parent, "choose a writable place with --out FILE.onnx")
    result = export_onnx(run, out, layout=args.layout, quantize=args.quantize)
    check = result.parity
    print(
        f"wrote {result.path} (uint8 {args.layout.upper()} input, normalisation, classes "
        "and provenance inside)"
    )
    print(_parity_line(check, " with ONNX Runtime"))
    if result.int8:
        q = result.int8
        speed = q["images_per_s"]["batch_32"]
        print(
            f"wrote {result.int8_path}: accuracy {q['accuracy_int8']:.2%} vs "
            f"{q['accuracy_fp32']:.2%} fp32 ({q['accuracy_change_points']:+.2f} points); "
            f"images/s at batch 32: torch {speed['torch']:,}, ONNX fp32 "
            f"{speed['onnx_fp32']:,}, int8 {speed['onnx_int8']:,}; size "
            f"{q['size_bytes']['fp32'] / 1e6:.2f} -> {q['size_bytes']['int8'] / 1e6:.2f} MB"
        )
    details = Path(result.path).with_suffix(".json")
    print(f"details: {details}")
    made = [Path(f) for f in (result.path, details, result.int8_path) if f]
    _log_to_mlflow(run.path, made, "export")
    return 0


def _parity_line(check: dict, runtime: str = "") -> str:
    """How an exported file compared with PyTorch, in one line."""
    return (
        f"checked on {check['images']:,} validation images{runtime}: top-1 agreement "
        f"{check['top1_agreement']:.2%}, largest probability difference "
        f"{check['max_probability_difference']:.1e}"
    )


def _export_mobile(args) -> int:
    """``cnnkit export RUN --format ort|executorch|coreml``: a file for a phone's runtime."""
    import cnnkit
    from cnnkit.deploy.mobile import FORMATS, export_mobile, require

    if args.layout != "nchw":
        raise ValueError(f"--layout is for --format onnx; --format {args.format} takes NCHW")
    require(args.format)  # before loading anything: a missing converter fails at once
    run = cnnkit.load_run(args.run, weights=args.weights, device="cpu")
    out = Path(args.out) if args.out else run.path / f"model{FORMATS[args.format]}"
    _check_writable(out.parent, f"choose a writable place with --out FILE{FORMATS[args.format]}")
    result = export_mobile(run, args.format, out, quantize=args.quantize)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.runtime})")
    check = result.parity
    if check is not None:
        print(_parity_line(check))
    for line in result.checked:
        print(f"  {line}")
    if result.int8 and "refused" in result.int8:
        print(f"int8 refused: {result.int8['refused']}")
    elif result.int8:
        q = result.int8
        size = q["size_bytes"]
        change = (
            f"accuracy {q['accuracy_int8']:.2%} vs {q['accuracy_fp32']:.2%} fp32 "
            f"({q['accuracy_change_points']:+.2f} points); "
            if "accuracy_int8" in q
            else f"{q['accuracy']}; "
        )
        print(
            f"wrote {result.int8_path}: {change}size {size['fp32'] / 1e6:.2f} -> "
            f"{size['int8'] / 1e6:.2f} MB"
        )
    print(f"details: {result.path}.json")
    return 0


def _export_triton(args) -> int:
    """``cnnkit export RUN --format triton``: an NVIDIA Triton model repository folder."""
    import cnnkit
    from cnnkit.deploy.triton import export_triton, require

    if args.quantize:
        raise ValueError("--quantize is for --format onnx; the Triton repository holds fp32")
    if args.layout != "nchw":
        raise ValueError("--layout is for --format onnx; the Triton repository takes NCHW")
    require()  # before loading anything: a missing tritonclient fails at once
    run = cnnkit.load_run(args.run, weights=args.weights, device="cpu")
    out = Path(args.out) if args.out else run.path / "triton"
    _check_writable(out, "choose a writable place with --out DIR")
    result = export_triton(run, out)
    print(
        f"wrote {result.model_dir}/: config.pbtxt, labels.txt, 1/model.onnx (model "
        f"'{result.name}', uint8 NCHW 'images' -> FP32 'probabilities', dynamic batching up "
        f"to {result.max_batch_size})"
    )
    print("checked (no Triton server was run):")
    for line in result.checks:
        print(f"  {line}")
    print(f"serve it with Triton (add --gpus all for GPUs): {result.command()}")
    print(
        "  <yy.mm>: a tritonserver release on NGC whose CUDA suits your driver; the -py3 "
        "images include the ONNX Runtime backend"
    )
    return 0


def _export_webapp(args) -> int:
    """``cnnkit export RUN --format webapp``: the browser app folder."""
    import cnnkit
    from cnnkit.deploy.webapp import check_output, ensure_ort_web, export_webapp

    if args.quantize:
        raise ValueError("--quantize is for --format onnx; the web app runs the fp32 model")
    if args.layout != "nchw":
        raise ValueError("--layout is for --format onnx; the web app feeds the model NCHW")
    run = cnnkit.load_run(args.run, weights=args.weights, device="cpu")
    out = Path(args.out) if args.out else run.path / "webapp"
    _check_writable(out.parent, "choose a writable place with --out DIR")
    check_output(out)  # not a folder of other files
    package = ensure_ort_web()  # before the export: a missing runtime fails at once
    result = export_webapp(run, out, ort_web=package)
    check = result.parity
    size = sum(result.files.values())
    print(
        f"wrote {result.path}/ ({len(result.files)} files, {size / 1e6:.1f} MB, ONNX Runtime "
        f"Web {result.ort_web}): open index.html from any static host (HTTPS or localhost "
        "for offline use and the camera), e.g. python -m http.server -d "
        f"{result.path} 8000"
    )
    print(_parity_line(check, " with ONNX Runtime"))
    print(f"details: {Path(result.path) / 'config.json'}")
    return 0


def cmd_serve(args) -> int:
    onnx_backend = args.backend == "onnx" or Path(args.model).suffix == ".onnx"
    _require_deploy_extras(
        "serve",
        "fastapi",
        "uvicorn",
        "prometheus_client",
        "python_multipart",  # form uploads, the page's among them
        *(("onnx", "onnxruntime") if onnx_backend else ()),
    )
    from cnnkit.deploy.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        backend=args.backend,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        workers=args.workers,
        **{  # only what was given: the service keeps its own defaults for the rest
            name: value
            for name, value in (
                ("max_request_pixels", args.max_request_pixels),
                ("decode_threads", args.decode_threads),
                ("upload_timeout_s", args.upload_timeout),
                ("header_timeout_s", args.header_timeout),
                ("max_queue", args.max_queue),
            )
            if value is not None
        },
    )
    return 0


def _image_files(arguments: list[str]) -> list[str]:
    """The files as given, each folder replaced by every image file under it (recursively,
    sorted; hidden files and folders left out, as the folder data sets do)."""
    from cnnkit.data.folder import IMAGE_EXTENSIONS, find_image_files

    files = []
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            files.append(argument)  # a missing or unreadable file gets its own error line
            continue
        found = find_image_files(folder)  # as a folder data set finds them
        if not found:
            raise ValueError(
                f"{folder}: no image files in this folder or below "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files += map(str, found)
    return files


# Images decoded and predicted at a time: a folder of any size needs bounded memory.
PREDICT_CHUNK = 256


def _write_predictions(path: Path, document: dict, top_k: int) -> None:
    """``document`` (as --json prints it) as JSON, or as CSV: a row per image with its
    ``top_k`` classes and probabilities, most likely first, or its error."""
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(document, indent=2) + "\n")
        return
    import csv

    ranks = range(1, top_k + 1)
    header = ["file", *(f"{kind}_{i}" for i in ranks for kind in ("class", "probability"))]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "error"])
        for prediction in document["predictions"]:
            cells = [prediction["source"]]
            for i in ranks:
                top = prediction.get("top", [])
                ranked = top[i - 1] if i <= len(top) else None
                cells += [ranked["class"], f"{ranked['probability']:.6f}"] if ranked else ["", ""]
            writer.writerow([*cells, prediction.get("error", "")])


def cmd_predict(args) -> int:
    import cnnkit

    output = Path(args.output) if args.output else None
    if output is not None:  # refused before the model is loaded or an image decoded
        if output.suffix.lower() not in (".csv", ".json"):
            raise ValueError(f"--output must be a .csv or .json file, got '{output}'")
        _check_writable(output.parent, "choose another --output")
    files = _image_files(args.files)
    if Path(args.run).suffix == ".onnx":
        _require_deploy_extras("predict", "onnx", "onnxruntime")
    run = cnnkit.load(args.run, weights=args.weights, device=args.device)  # run or .onnx
    results = []
    for start in range(0, len(files), PREDICT_CHUNK):
        chunk = run.predict(files[start : start + PREDICT_CHUNK], top_k=args.top_k)
        results += chunk
        if args.json:
            continue
        for r in chunk:  # as they come: a large folder shows progress
            if r.error:
                print(f"error: {r.error}", file=sys.stderr)
            elif output is None:
                top = ", ".join(f"{c} {p:.1%}" for c, p in r.top)
                print(f"{r.source}: {r.label}  ({top})")
    failed = [r for r in results if r.error]
    document = {"run": str(run.path), "predictions": [r.to_dict() for r in results]}
    if args.json:
        print(json.dumps(document, indent=2))
    if output is not None:
        _write_predictions(output, document, min(args.top_k, len(run.classes)))
        errors = f" ({len(failed):,} could not be read)" if failed else ""
        summary = f"wrote {len(results):,} predictions{errors} to {output}"
        print(summary, file=sys.stderr if args.json else sys.stdout)  # stdout holds the JSON
    return 1 if failed else 0


def cmd_datasets(args) -> int:
    from cnnkit.data import BUILTINS, builtin, is_available, load_dataset

    con = _console()
    if args.action == "list":
        t = _table("built-in data sets", "name", "what", "image", "local copy", text_columns=4)
        for spec in BUILTINS.values():
            where = is_available(spec, args.data_dir)
            t.add_row(
                spec.name,
                spec.title,
                "x".join(map(str, spec.shape)),
                str(where) if where else f"no (downloads from {spec.mirrors[0]})",
            )
        con.print(t)
        con.print(
            "Search order: --data-dir, $CNNKIT_DATA, /usr/share/datasets, "
            "~/.cache/cnnkit/datasets, then download (unless CNNKIT_OFFLINE=1)."
        )
        return 0
    if args.action == "pack":
        return _pack(args, con)
    if args.action == "audit":
        from cnnkit.config import Config, apply_overrides

        if not args.name:
            raise ValueError("usage: cnnkit datasets audit DATA (a built-in name, folder or CSV)")
        settings = {"data": args.name, "data_dir": args.data_dir}
        cfg = apply_overrides(Config(), {k: v for k, v in settings.items() if v is not None})
        out = args.audit_out or f"audit-{Path(args.name).name}"
        return _audit(args, cfg, Path(out))
    if not args.name:
        raise ValueError(
            f"usage: cnnkit datasets {args.action} {'NAME' if args.action == 'info' else 'PATH'}"
        )
    if args.action == "check":
        return _check(args, con)
    spec = builtin(args.name)
    data = load_dataset(spec.name, data_dir=args.data_dir, val_split=0)
    con.print(f"[bold]{spec.name}[/]: {spec.title}")
    con.print(
        f"images {'x'.join(map(str, data.shape))} uint8; train {len(data.train):,}, "
        f"test {len(data.test):,}; mean {data.mean}, std {data.std} (training set)"
    )
    t = _table(None, "class", "index", "train", "test")
    import torch

    train_counts = torch.bincount(data.train.labels, minlength=len(data.classes)).tolist()
    test_counts = torch.bincount(data.test.labels, minlength=len(data.classes)).tolist()
    for i, name in enumerate(data.classes):
        t.add_row(name, str(i), f"{train_counts[i]:,}", f"{test_counts[i]:,}")
    con.print(t)
    return 0


def _pack(args, con) -> int:
    if not args.name or not args.out:
        raise ValueError(
            "usage: cnnkit datasets pack SRC OUT (SRC: a built-in name, folder or CSV list; "
            "OUT: a new or empty folder for the shards)"
        )
    from cnnkit.data.pack import pack

    index = pack(
        args.name,
        args.out,
        shard_size=args.shard_size,
        max_count=args.max_count,
        max_side=args.max_side,
        quality=args.quality,
        val_split=args.val_split,
        test_split=args.test_split,
        seed=args.seed,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(index, indent=2))
        return 0
    splits = index["splits"]
    t = _table(f"{args.out}: shards of {args.name}", "split", "images", "shards", "MB")
    for name, split in splits.items():
        size = sum(s["bytes"] for s in split["shards"])
        t.add_row(name, f"{split['count']:,}", str(len(split["shards"])), f"{size / 1e6:,.1f}")
    con.print(t)
    images = sum(s["count"] for s in splits.values())
    seconds = index["seconds"]
    con.print(
        f"{images:,} images in {sum(len(s['shards']) for s in splits.values())} shards, "
        f"{index['bytes'] / 1e6:,.1f} MB, in {seconds:.1f}s ({images / max(seconds, 1e-9):,.0f} "
        f"images/s); input {index['channels']}x{index['image_size']}x{index['image_size']}",
        markup=False,
    )
    skipped = index["skipped"]
    if skipped:
        con.print(f"skipped {len(skipped)} file(s) that could not be read:", markup=False)
        for s in skipped[:10]:
            con.print(f"    {s['file']}: {s['reason']}", markup=False, soft_wrap=True)
        if len(skipped) > 10:
            con.print(f"    ... and {len(skipped) - 10} more (index.json lists all)")
    return 0


def _check(args, con) -> int:
    from rich.markup import escape

    from cnnkit.data.doctor import check_dataset

    report = check_dataset(args.name, near_bits=args.near_bits)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 1 if report.errors else 0
    splits = list(report.counts)
    t = _table(f"{report.root}: images per class", "class", *splits)
    for i, name in enumerate(report.classes):
        t.add_row(name, *(f"{report.counts[s][i]:,}" for s in splits))
    con.print(t)
    style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    for f in report.findings:
        con.print(
            f"[{style[f.level]}]{f.level}[/] {escape(f.check)}: {escape(f.message)}",
            soft_wrap=True,
        )
        for line in f.files[:5]:
            con.print(f"    {line}", markup=False, soft_wrap=True)
        if len(f.files) > 5:
            con.print(f"    ... and {len(f.files) - 5} more (--json lists all)")
    if not report.findings:
        con.print("no problems found")
    return 1 if report.errors else 0


def cmd_audit(args) -> int:
    from cnnkit.config import Config
    from cnnkit.runs.checkpoint import read_checkpoint

    run_dir = Path(args.run)
    found = [run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no best.pt or last.pt: not a trained run")
    cfg = Config.from_dict(read_checkpoint(found[0]).config)
    return _audit(args, cfg, Path(args.audit_out or run_dir / "audit"))


def _audit(args, cfg, out: Path) -> int:
    """datasets audit and audit RUN: run it, write the files, show the top rows."""
    from cnnkit.config import apply_overrides
    from cnnkit.train.audit import audit, write_audit

    overrides = {}
    if args.model:
        overrides["model.name"] = args.model
    if args.pretrained:
        overrides["model.pretrained"] = True
    cfg = apply_overrides(cfg, overrides)
    result = audit(cfg, folds=args.folds, epochs=args.epochs, limit=args.limit, method=args.method)
    files = write_audit(result, out)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    con = _console()
    con.print(
        f"{result.data}: {len(result.labels):,} images; {result.method}; cross-validated "
        f"accuracy {result.cv_accuracy:.2%}; {len(result.issues):,} likely label errors "
        f"({result.seconds:.0f}s)"
    )
    t = _table(
        f"most suspicious first (top {min(args.top, len(result.issues))})",
        "rank",
        "file",
        "given",
        "suggested",
        "p(given)",
        "p(suggested)",
        text_columns=4,
    )
    for r in result.rows(args.top):
        t.add_row(
            str(r["rank"]),
            r["name"],
            r["given"],
            r["suggested"],
            f"{r['given_probability']:.3f}",
            f"{r['suggested_probability']:.3f}",
        )
    con.print(t)
    print(f"wrote {files['csv']} (edit, then train --relabel / --exclude), {files['html']}")
    return 0


def cmd_bench(args) -> int:
    from cnnkit.bench import bench, ratios

    results = bench(
        only=args.only.split(",") if args.only else None,
        seeds=args.seeds,
        epochs=args.epochs,
        keras_python=args.keras_python,
    )
    t = _table(
        "cnnkit bench (median over seeds, with the range)",
        "measurement",
        "runs",
        "train seconds",
        "images/s",
        "test accuracy (mean)",
        "tutorial's speed-up",
    )
    speedup = ratios(results)
    for name, r in results.items():
        compiling = r.get("compile_seconds_median")
        t.add_row(
            name,
            str(r["runs"]),
            f"{r['train_seconds_median']:.1f} ({r['train_seconds_min']:.1f}-"
            f"{r['train_seconds_max']:.1f})"
            + (f" + {compiling:.0f} s compiling" if compiling is not None else ""),
            f"{r['images_per_s_median']:,}",
            f"{r['test_accuracy_mean']:.2%} ({r['test_accuracy_min']:.2%}-"
            f"{r['test_accuracy_max']:.2%})",
            f"{speedup[name]:.2f}x" if name in speedup else "",
        )
    _console().print(t)
    return 0


def _size_text(size_bytes: int) -> str:
    for unit in ("B", "kB", "MB"):
        if size_bytes < 1000:
            return f"{size_bytes:,.0f} {unit}" if unit == "B" else f"{size_bytes:,.1f} {unit}"
        size_bytes /= 1000
    return f"{size_bytes:,.1f} GB"


def cmd_cache(args) -> int:
    from cnnkit.data.cache import cache_folders, cache_root, check_names, clear_cache

    if args.action == "list" and args.names:
        raise ValueError("usage: cnnkit cache [list] | cnnkit cache clear [NAME ...] [--yes]")
    check_names(args.names)  # before anything is measured, asked or deleted
    folders = cache_folders()
    if args.action == "list":
        if args.json:
            listing = {"root": str(cache_root()), "folders": [f.to_dict() for f in folders]}
            print(json.dumps(listing, indent=2))
            return 0
        t = _table(
            f"cnnkit's cache, {cache_root()}",
            "name",
            "holds",
            "folder",
            "size",
            "entries",
            text_columns=3,
        )
        for f in folders:
            t.add_row(f.name, f.what, str(f.path), _size_text(f.size_bytes), f"{f.entries:,}")
        con = _console()
        con.print(t)
        con.print("Clear with: cnnkit cache clear [decoded|datasets] (default: both)", markup=False)
        return 0
    targets = [f for f in folders if (not args.names or f.name in args.names) and f.path.is_dir()]
    if not targets:
        print("nothing to clear")
        return 0
    summary = ", ".join(f"{f.path} ({_size_text(f.size_bytes)})" for f in targets)
    if not args.yes:
        if not sys.stdin.isatty():  # no one to ask: deleting needs an explicit --yes
            raise ValueError(f"this deletes {summary}; add --yes to clear without asking")
        if input(f"delete {summary}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 0
    removed = clear_cache([f.name for f in targets])
    freed = sum(f.size_bytes for f in removed)
    print(f"deleted {', '.join(str(f.path) for f in removed)}: {_size_text(freed)} freed")
    return 0


def cmd_models(args) -> int:
    from cnnkit.models import SPEC_HELP, create_model, list_models

    con = _console()
    if args.spec_help:
        print(SPEC_HELP)
        return 0
    t = _table(
        "models (parameter counts for 10 classes)",
        "name",
        "description",
        "1x28x28",
        "3x32x32",
        text_columns=2,
    )
    for entry in list_models():
        counts = []
        for c, s in ((1, 28), (3, 32)):
            m = create_model(entry.name, 10, c, (s, s))
            counts.append(f"{sum(p.numel() for p in m.parameters()):,}")
        t.add_row(entry.name, entry.description, *counts)
    con.print(t)
    con.print(
        "Also: any timm architecture (resnet50, efficientnet_lite0, convnext_tiny, ...) or "
        "torchvision one (tv:resnet50, ...), with ImageNet weights via --pretrained; or a "
        "layer spec such as conv32-pool-conv64-pool-drop0.25-fc64 (cnnkit models --spec-help)."
    )
    return 0
