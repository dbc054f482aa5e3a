"""``cnnkit compare``: runs side by side, what differs in their configs and how they did."""

from __future__ import annotations

from pathlib import Path

from cnnkit.evaluate.plots import pyplot

from .directory import throughput
from .run import load_run


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


# Settings that name or file a run rather than change what it learns.
NOT_COMPARED = ("run.name", "run.runs_dir", "run.log", "run.mlflow_uri", "run.experiment")
RANKED_BY = "val_accuracy"
RANKING_NOTE = (
    "ranked by validation accuracy (the split that chose each run's best.pt); the "
    "{split} split is shown beside it, never used to choose"
)


def compare_runs(
    paths: list[str | Path], split: str | None = None, plot: str | Path | None = None
) -> dict:
    """Config differences and key metrics of each run on ``split``; the best is marked by
    validation accuracy, then validation loss: choosing by the test split would make the
    test accuracy of the chosen run optimistic. ``plot``: PNG path for the validation
    curves."""
    if len(paths) < 2:
        raise ValueError("compare needs at least two runs")
    runs = [load_run(p) for p in paths]
    configs = [_flat(r.config.to_dict()) for r in runs]
    keys = [
        k
        for k in configs[0]
        if len({repr(c.get(k)) for c in configs}) > 1 and k not in NOT_COMPARED
    ]
    rows, used = [], []
    for run in runs:
        report = run.evaluate(split=split, save=False)  # None: test if the run has one
        used.append(report.split)
        history = run.history
        images, seconds = throughput(history)
        rows.append(
            {
                "run": str(run.path),
                "split": report.split,
                "val_accuracy": run.val_accuracy,
                "val_loss": (run.checkpoint_metrics or {}).get("val_loss"),
                "accuracy": report.accuracy,
                "macro_f1": report.macro["f1"],
                "parameters": sum(p.numel() for p in run.model.parameters()),
                "training_seconds": seconds,
                "images_per_s": images / seconds if seconds else None,
                "epochs": len(history),
                "best_val_acc": max(
                    (r["val_acc"] for r in history if r["val_acc"] is not None), default=None
                ),
            }
        )
    ranked = [r for r in rows if r["val_accuracy"] is not None]
    best = max(
        ranked,
        key=lambda r: (
            r["val_accuracy"],
            -(r["val_loss"] if r["val_loss"] is not None else float("inf")),
        ),
        default=None,
    )
    asked, split = split, "/".join(dict.fromkeys(used))  # the split(s) the figures are from
    note = RANKING_NOTE.format(split=split)
    if "test" not in used:  # the figures beside the ranking are the chooser's own
        why = "--split val" if asked == "val" else "these runs have no test split"
        note = (
            f"ranked by validation accuracy; {why}, so the accuracy beside it is on the "
            "validation split that chose best.pt (optimistic)"
        )
    unranked = [Path(r["run"]).name for r in rows if r["val_accuracy"] is None]
    if unranked:
        note += f"; not ranked (no validation split): {', '.join(unranked)}"
    result = {
        "split": split,
        "ranked_by": RANKED_BY,
        "ranking": note,
        "differences": {k: [c.get(k) for c in configs] for k in keys},
        "runs": rows,
        "best": best["run"] if best else None,
    }
    if plot:
        result["plot"] = str(_plot(runs, Path(plot)))
    return result


def _plot(runs, path: Path) -> Path:
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        h = [r for r in run.history if r["val_loss"] is not None]
        epochs = [r["epoch"] for r in h]
        ax_loss.plot(epochs, [r["val_loss"] for r in h], "o-", label=run.path.name)
        ax_acc.plot(epochs, [r["val_acc"] for r in h], "o-", label=run.path.name)
    for ax, label in ((ax_loss, "validation loss"), (ax_acc, "validation accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
