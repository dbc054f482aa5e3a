"""A run directory: its name, the files that mark it as a run, the split file and the
metrics file.

runs/<name>/ holds config.yaml (the resolved settings), train.log, metrics.csv (one row
per epoch), split.json (folder data sets: the exact files of every split), best.pt and
last.pt (see checkpoint.py), and what evaluation, reports and exports write later.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

from cnnkit.config import Config
from cnnkit.data import DataSplits, is_builtin

RUN_MARKERS = ("config.yaml", "last.pt", "best.pt", "metrics.csv")
CONFIG_FILE, METRICS_FILE, SPLIT_FILE, LOG_FILE = (
    "config.yaml",
    "metrics.csv",
    "split.json",
    "train.log",
)

METRIC_COLUMNS = [
    "epoch",
    "stage",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "images_per_s",
    "compile_seconds",  # torch.compile's compiling steps in this epoch (empty without it)
]


def default_run_name(cfg: Config) -> str:
    data = Path(cfg.data.name).name if not is_builtin(cfg.data.name) else cfg.data.name
    raw = f"{data}-{cfg.model.name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)[:60].strip("_-")


def make_run_dir(cfg: Config, overwrite: bool = False) -> tuple[Path, Path | None]:
    """(runs/<name>, a fresh directory; the run it replaces, set aside, or None).

    An automatic name gets -2, -3... instead of clashing; an explicit --name that exists is
    an error unless ``overwrite``. The replaced run is moved beside it (``.<name>.replaced``),
    not deleted: the caller deletes it once the new run has a checkpoint, or puts it back
    when the new one fails before that (a typo in --data must not cost the old run).
    """
    runs = Path(cfg.run.runs_dir)
    replaced = None
    if cfg.run.name:
        path = runs / cfg.run.name
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"run directory {path} already exists. Resume it with "
                    f"'cnnkit train --resume {path}', choose another --name, or pass "
                    "--overwrite to replace it."
                )
            if not any((path / m).exists() for m in RUN_MARKERS):
                raise FileExistsError(f"{path} exists and is not a cnnkit run; not replacing it")
            replaced = path.with_name(f".{path.name}.replaced")
            shutil.rmtree(replaced, ignore_errors=True)  # one left by a crash: older still
            path.rename(replaced)
        path.mkdir(parents=True, exist_ok=True)
        return path, replaced
    base, i = default_run_name(cfg), 1
    runs.mkdir(parents=True, exist_ok=True)
    while True:  # mkdir claims the name: two runs started at once never share a folder
        path = runs / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path, None
        except FileExistsError:
            i += 1


def save_split(data: DataSplits, path: Path) -> None:
    """split.json: the exact files of every split, so evaluation uses the same ones."""
    payload = {"root": data.root, "classes": data.classes, **(data.files or {})}
    path.write_text(json.dumps(payload))


# ---------------------------------------------------------------- metrics.csv


def append_metrics(path: Path, row: dict) -> None:
    """Append one epoch's row (flushed and closed, so a crash loses nothing)."""
    new = not path.exists()
    # a multi-label run's rows have the validation mAP too
    columns = METRIC_COLUMNS + (["val_map"] if "val_map" in row else [])
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def rewrite_metrics(path: Path, history: list[dict]) -> None:
    """metrics.csv anew from a checkpoint's history, which is authoritative: a crash between
    writing a row and the checkpoint must not leave a duplicate or a missing row."""
    path.unlink(missing_ok=True)
    for row in history:
        append_metrics(path, row)


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv as a list of dicts: floats (None for empty cells), the stage as text."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))

    def value(key: str, v: str | None):
        if key == "stage":
            return v or "train"
        return float(v) if v not in ("", None) else None

    return [{k: value(k, v) for k, v in r.items()} for r in rows]


def throughput(history: list[dict]) -> tuple[float, float]:
    """(training images, training seconds) summed over a history's epochs."""
    images = sum(r["images_per_s"] * r["seconds"] for r in history)
    return images, sum(r["seconds"] for r in history)
