"""PNG plots: the confusion matrix and the training curves (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(
    matrix: list[list[int]], classes: list[str], title: str, path: Path
) -> Path:
    import numpy as np

    plt = _pyplot()
    m = np.asarray(matrix)
    n = len(classes)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    rows = m.sum(1, keepdims=True).clip(min=1)
    im = ax.imshow(m / rows, cmap="Blues", vmin=0, vmax=1)  # colour: share of the true class
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    dark = m[i, j] / rows[i, 0] > 0.5
                    ax.text(
                        j,
                        i,
                        str(m[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(history: list[dict], title: str, path: Path) -> Path:
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train")
        val = [
            (e, r[f"val_{metric}"])
            for e, r in zip(epochs, history, strict=True)
            if r.get(f"val_{metric}") is not None
        ]
        if val:
            ax.plot(*zip(*val, strict=True), "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
