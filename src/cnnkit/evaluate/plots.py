"""PNG plots: the confusion matrix and the training curves (matplotlib, imported lazily)."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(
    matrix: list[list[int]], classes: list[str], title: str, path, normalized: bool = False
):
    import numpy as np

    plt = pyplot()
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
                        f"{m[i, j] / rows[i, 0]:.0%}" if normalized else str(m[i, j]),
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


def plot_curves(history: list[dict], title: str, path, with_lr: bool = False):
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3 if with_lr else 2, figsize=(16 if with_lr else 11, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    if with_lr:
        axes[2].plot(epochs, [r["lr"] for r in history], "o-", color="tab:green")
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("learning rate (end of epoch)")
        axes[2].grid(alpha=0.3)
        axes[2].xaxis.get_major_locator().set_params(integer=True)
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


def plot_reliability(bins: list[dict], ece: float, title: str, path):
    """Accuracy against confidence per bin: a calibrated model follows the diagonal."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    filled = [b for b in bins if b["count"]]
    width = bins[0]["high"] - bins[0]["low"]
    ax.bar(
        [b["low"] for b in filled],
        [b["accuracy"] for b in filled],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot(
        [b["confidence"] for b in filled],
        [b["accuracy"] for b in filled],
        "o",
        color="tab:red",
        label="mean confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {ece:.4f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
