"""train() and resume(): set up a run directory, data, model and hooks, then call fit()."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from cnnkit.config import Config, apply_overrides, dump_config
from cnnkit.data import DataSplits, load_dataset
from cnnkit.device import resolve_device, resolve_precision
from cnnkit.models import create_model
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.hooks import METRIC_COLUMNS, ConsoleProgress, Hook, MetricsCSV, TextLog
from cnnkit.train.loop import TrainState, fit

RUN_MARKERS = ("config.yaml", "last.pt", "best.pt", "metrics.csv")


def default_run_name(cfg: Config) -> str:
    raw = f"{cfg.data.name}-{cfg.model.name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)[:60].strip("_-")


def make_run_dir(cfg: Config, overwrite: bool = False) -> Path:
    """runs/<name>: a fresh directory. An automatic name gets -2, -3... instead of clashing;
    an explicit --name that exists is an error unless ``overwrite``."""
    runs = Path(cfg.run.runs_dir)
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
            shutil.rmtree(path)
    else:
        base = default_run_name(cfg)
        path, i = runs / base, 2
        while path.exists():
            path, i = runs / f"{base}-{i}", i + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_meta(cfg: Config, data: DataSplits) -> dict:
    """What every checkpoint of the run says about itself besides its weights."""
    c, h, w = data.shape
    return {
        "model": {
            "name": cfg.model.name,
            "num_classes": len(data.classes),
            "in_chans": c,
            "input_size": [h, w],
        },
        "classes": list(data.classes),
        "preprocessing": {
            "channels": c,
            "size": [h, w],
            "mean": list(data.mean),
            "std": list(data.std),
            "resize": "stretch",
            "interpolation": "bilinear",
        },
        "config": cfg.to_dict(),
        "data": {
            "name": data.name,
            "train": len(data.train),
            "val": len(data.val) if data.val is not None else 0,
            "test": len(data.test) if data.test is not None else 0,
        },
    }


def _execute(
    cfg: Config, run_dir: Path, quiet: bool, hooks: list[Hook], resume: dict | None = None
):
    from cnnkit.run import load_run

    device = resolve_device(cfg.train.device)
    console = ConsoleProgress(quiet=quiet)
    all_hooks = [
        console,
        MetricsCSV(run_dir / "metrics.csv"),
        TextLog(run_dir / "train.log"),
        *hooks,
    ]

    def say(text: str) -> None:
        for h in all_hooks:
            h.message(text)

    d = cfg.data
    data = load_dataset(
        d.name, data_dir=d.data_dir, val_split=d.val_split, seed=cfg.train.seed, limit=d.limit
    )
    torch.manual_seed(cfg.train.seed)  # model initialisation
    c, h, w = data.shape
    model = create_model(cfg.model.name, len(data.classes), c, (h, w))
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
    params = sum(p.numel() for p in model.parameters())
    dtype = resolve_precision(cfg.train.precision, device)

    say(
        f"data   {data.name}: {data.sizes()} images of {c}x{h}x{w}, {len(data.classes)} classes "
        f"(validation split {d.val_split:.0%} stratified, seed {cfg.train.seed}; test held out)"
    )
    for note in data.notes:
        say(f"       {note}")
    say(f"model  {cfg.model.name}: {params:,} parameters")
    say(
        f"train  {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, {cfg.optim.optimizer} "
        f"lr {cfg.optim.lr:g} ({cfg.optim.schedule}), augment {d.augment}, on {device} "
        f"{str(dtype).removeprefix('torch.')}"
    )
    say(f"run    {run_dir}")

    state = fit(
        model,
        data,
        cfg,
        device=device,
        run_dir=run_dir,
        checkpoint_meta=checkpoint_meta(cfg, data),
        hooks=all_hooks,
        resume=resume["train_state"] if resume else None,
    )
    _summarise(state, run_dir, say)
    return load_run(run_dir, device=str(device))


def _summarise(state: TrainState, run_dir: Path, say) -> None:
    rows = state.history
    images = sum(r["images_per_s"] * r["seconds"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    reason = {
        "completed": "finished",
        "early_stopping": "stopped early (no improvement)",
        "time_budget": "stopped: time budget spent",
        "diverged": "stopped: loss diverged",
    }[state.stop_reason]
    best = (
        f"best epoch {state.best_epoch} ({state.best:.4f})"
        if state.best is not None
        else "no best epoch"
    )
    say(
        f"done   {reason} after {len(rows)} epochs; {best}; "
        f"{images / max(seconds, 1e-9):,.0f} training images/s over {seconds:.1f}s",
    )
    say(f"files  {run_dir}/ best.pt last.pt metrics.csv config.yaml train.log")


def train(
    config: Config | None = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    hooks: list[Hook] = (),
    **settings,
):
    """Train a model and return its Run.

    ``settings`` are any config keys, flat or dotted: ``train(data="mnist",
    model="seed-cnn", epochs=5, lr=1e-3)`` or ``train(**{"optim.lr": 1e-3})``.
    """
    cfg = apply_overrides(config or Config(), settings)
    run_dir = make_run_dir(cfg, overwrite)
    dump_config(cfg, run_dir / "config.yaml")
    return _execute(cfg, run_dir, quiet, list(hooks))


# Settings that may change when a run is resumed: they do not alter what was trained so far.
RESUMABLE_SETTINGS = ("train.epochs", "train.time_budget", "train.device", "train.patience")


def resume(path: str | Path, *, quiet: bool = False, hooks: list[Hook] = (), **settings):
    """Continue a run from its last.pt; ``epochs`` may be raised to train longer."""
    run_dir = Path(path)
    ckpt = load_checkpoint(run_dir / "last.pt" if run_dir.is_dir() else run_dir)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    if "train_state" not in ckpt:
        raise ValueError(f"{run_dir}/last.pt holds no training state; it cannot be resumed")
    cfg = Config.from_dict(ckpt["config"])
    from cnnkit.config import resolve_key

    for key in settings:
        if resolve_key(key) not in RESUMABLE_SETTINGS:
            raise ValueError(
                f"cannot change '{key}' when resuming; only {', '.join(RESUMABLE_SETTINGS)} "
                "may change. Start a new run for other settings."
            )
    cfg = apply_overrides(cfg, settings)
    state = ckpt["train_state"]["state"]
    if state["epoch"] >= cfg.train.epochs and state["step"] == 0:
        raise ValueError(
            f"{run_dir} already finished its {cfg.train.epochs} epochs; pass a larger --epochs "
            "to train longer"
        )
    dump_config(cfg, run_dir / "config.yaml")
    # metrics.csv is rewritten from the checkpoint's history, which is authoritative: a crash
    # between writing a row and the checkpoint must not leave a duplicate or missing row.
    csv_hook = MetricsCSV(run_dir / "metrics.csv")
    (run_dir / "metrics.csv").unlink(missing_ok=True)
    for row in state["history"]:
        csv_hook.on_epoch_end({k: row.get(k) for k in METRIC_COLUMNS})
    return _execute(cfg, run_dir, quiet, list(hooks), resume=ckpt)
