"""evaluate, report, explain, compare and audit: what a trained run did."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import (
    _check_writable,
    _console,
    _log_to_mlflow,
    _require_extra,
    _say_rebuilding,
    _table,
)


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
    if run.multilabel is not None:
        return _print_multilabel(run, report, choice, plain if args.tta else None)
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
            f" plain, a change of {(report.accuracy - plain.accuracy) * 100:+.2f} points "
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


def _score_text(value: float | None) -> str:
    """An AP or mAP to 4 places; 'n/a' where no image had the label."""
    return "n/a" if value is None else f"{value:.4f}"


def _print_multilabel(run, report, choice, plain=None) -> int:
    """evaluate's table for a multi-label run: mAP and the decisions at its thresholds;
    ``plain``: the report without test-time augmentation, for comparison."""
    m = report.metrics
    print(
        f"{run.path}: {run.config.model.name}, {report.split} split ({choice.reason}), "
        f"{m['num_images']:,} images, {len(run.classes)} labels"
    )
    fitted = run.multilabel.get("fitted_on")
    where = "fitted on the validation split" if fitted else "one for all (--threshold)"
    mean_ap = _score_text(m["mAP"])
    print(
        f"mAP {mean_ap} (macro; micro {m['mAP_micro']:.4f})  at the thresholds ({where}): "
        f"example F1 {m['example_f1']:.4f}, Hamming loss {m['hamming_loss']:.4f}, subset "
        f"accuracy {m['subset_accuracy']:.2%}, macro F1 {m['macro_f1']:.4f}"
    )
    t = _table(None, "label", "AP", "precision", "recall", "f1", "threshold", "support")
    for name, r in m["per_label"].items():
        t.add_row(
            name,
            _score_text(r["ap"]),
            f"{r['precision']:.4f}",
            f"{r['recall']:.4f}",
            f"{r['f1']:.4f}",
            f"{r['threshold']:.3f}",
            f"{r['support']:,}",
        )
    _console().print(t)
    if plain is not None:
        before = plain.metrics
        print(
            f"test-time augmentation: mAP {mean_ap} vs {_score_text(before['mAP'])} plain, "
            f"example F1 {m['example_f1']:.4f} vs {before['example_f1']:.4f} (the table "
            "shows the TTA numbers)"
        )
    print(f"wrote {run.path / f'eval-{report.split}.json'}")
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
    if "stored_rule" in result:
        r = result["stored_rule"]
        print(
            f"the run's threshold ({r['score']} {r['threshold']:.3f}, fitted on validation) "
            f"answers 'unknown' for {r['out_rejected']:.2%} of {outside['data']} and "
            f"{r['in_rejected']:.2%} of {inside['data']} {inside['split']}"
        )
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
    if report.get("task") == "multilabel":
        print(
            f"{report['split']} mAP {m['mAP']:.4f}, example F1 {m['example_f1']:.4f}, Hamming "
            f"loss {m['hamming_loss']:.4f}, subset accuracy {m['subset_accuracy']:.2%}"
        )
        print(f"wrote {html_path} and {json_path}")
        _log_to_mlflow(run.path, [html_path, json_path])
        return 0
    print(
        f"{report['split']} accuracy {m['accuracy']:.2%}, macro F1 {m['macro_avg']['f1']:.4f}, "
        f"ECE {report['calibration']['ece']:.4f}; diagnosis: "
        + ", ".join(v["verdict"] for v in report["diagnosis"])
    )
    for finding in report["diagnosis"]:  # what the page says, so the terminal says it too
        if finding.get("summary"):
            print(f"  {finding['verdict']}: {finding['summary']}")
        for remedy in finding.get("remedies", []):
            print(f"    - {remedy}")
    print(f"wrote {html_path} and {json_path}")
    _log_to_mlflow(run.path, [html_path, json_path])
    return 0


def cmd_explain(args) -> int:
    import cnnkit
    from cnnkit.evaluate.explain import viewable

    run = cnnkit.load_run(args.run, weights=args.weights, device=args.device)
    out = Path(args.out) if args.out else run.path / "explain"
    out.mkdir(parents=True, exist_ok=True)
    if args.feature_maps:
        return _feature_maps(run, args.files, args.layer, out)
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
        unknown = " (unknown: below the out-of-distribution threshold)" if pred.unknown else ""
        print(f"{pred.source}: {pred.top[0][0]} {pred.top[0][1]:.1%}{unknown} -> {target}")
    return 1 if failed else 0


def _feature_maps(run, files: list[str], layer: str | None, out: Path) -> int:
    """explain --feature-maps: one grid of the layer's maps per image file."""
    from cnnkit.data.decode import ImageReadError
    from cnnkit.evaluate.explain import feature_grid

    failed = 0
    for path in files:
        try:
            maps, name = run.feature_maps(path, layer)
        except (OSError, ImageReadError) as e:  # this file only; a wrong --layer stops all
            print(f"error: {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        target = out / f"{Path(path).stem}-features.png"
        feature_grid(maps).save(target)
        k, h, w = maps.shape
        print(f"{path}: {name}, {k} maps of {h}x{w} -> {target}")
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
