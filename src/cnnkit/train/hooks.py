"""Hooks observe a training run and record it: progress bar, metrics.csv, train.log.

They are called by ``fit()`` at fixed points and never change what it does.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from cnnkit.runs.directory import append_metrics


class Hook:
    def on_train_start(self, info: dict) -> None: ...
    def on_epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int) -> None: ...
    def on_step(self, step: int, sums: torch.Tensor) -> None: ...
    def on_epoch_end(self, row: dict) -> None: ...
    def on_train_end(self, summary: dict) -> None: ...
    def message(self, text: str) -> None: ...


def format_epoch(row: dict, epochs: int) -> str:
    val = (
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}"
        if row.get("val_loss") is not None
        else "no val"
    )
    if row.get("val_map") is not None:  # multi-label: acc is the share of right yes/no's
        val += f" mAP {row['val_map']:.4f}"
    stage = "" if row.get("stage", "train") == "train" else f"[{row['stage']}] "
    return (
        f"{stage}epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} "
        f"acc {row['train_acc']:.2%}  {val}  lr {row['lr']:.2e}  "
        f"{row['seconds']:.1f}s  {row['images_per_s']:,.0f} img/s"
        + ("  (stopped early in the epoch)" if row.get("partial") else "")
    )


class ConsoleProgress(Hook):
    """A live bar per epoch (loss, accuracy, images/s) and a summary line per epoch.

    The bar reads the device-side running sums every ``refresh_every`` steps only, so it
    costs one host synchronisation per refresh, never one per step.
    """

    def __init__(self, quiet: bool = False, refresh_every: int = 25):
        from rich.console import Console

        self.console = Console(stderr=False, highlight=False)
        self.quiet = quiet
        self.refresh_every = refresh_every
        self.progress = None
        self.epochs = 0

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, soft_wrap=True)

    def on_train_start(self, info: dict) -> None:
        self.epochs = info["epochs"]

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int) -> None:
        if self.quiet or not self.console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, completed=start_step, stats="")
        self._t0, self._n0 = None, None

    def on_step(self, step: int, sums: torch.Tensor) -> None:
        if self.progress is None or (step + 1) % self.refresh_every:
            return
        import time

        loss_sum, correct, count = sums.tolist()  # the one sync per refresh
        now = time.perf_counter()
        rate = ""
        if self._t0 is not None and now > self._t0:
            rate = f" {(count - self._n0) / (now - self._t0):,.0f} img/s"
        self._t0, self._n0 = now, count
        stats = f"loss {loss_sum / max(count, 1):.4f} acc {correct / max(count, 1):.2%}{rate}"
        self.progress.update(self.task, completed=step + 1, stats=stats)

    def _stop_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_epoch_end(self, row: dict) -> None:
        self._stop_bar()
        self.message(format_epoch(row, self.epochs))

    def on_train_end(self, summary: dict) -> None:
        self._stop_bar()


class MetricsCSV(Hook):
    """Appends one row per epoch to metrics.csv (flushed, so a crash loses nothing)."""

    def __init__(self, path: Path):
        self.path = path

    def on_epoch_end(self, row: dict) -> None:
        append_metrics(self.path, row)


class TextLog(Hook):
    """train.log: the settings, the data sizes, every epoch and how the run ended."""

    def __init__(self, path: Path):
        self.logger = logging.getLogger(f"cnnkit.run.{path.parent}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.logger.addHandler(self.handler)
        self.epochs = 0

    def message(self, text: str) -> None:
        self.logger.info(text)

    def on_train_start(self, info: dict) -> None:
        self.epochs = info["epochs"]
        self.logger.info("%s stage: %s", info["stage"], " ".join(sys.argv))

    def on_epoch_end(self, row: dict) -> None:
        self.logger.info(format_epoch(row, self.epochs))

    def on_train_end(self, summary: dict) -> None:
        self.logger.info("finished: %s", summary)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
