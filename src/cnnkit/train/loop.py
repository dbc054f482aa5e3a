"""fit(): the training loop. It reads top to bottom: batches in, loss, backward, step,
schedule; at the end of each epoch, validate, checkpoint, tell the hooks, maybe stop.

The data path is the fast one: the whole training set sits on the device as uint8, a batch
is an index slice of it, converted and augmented there as whole-batch tensor operations.
Loss and accuracy are summed on the device; the host reads them once per epoch (and the
progress bar every few dozen steps), never once per step. On a GPU an epoch is timed with
CUDA events, so its seconds are the GPU's, whatever the host did meanwhile.

Resuming is exact: each epoch's shuffle and augmentation come from a generator seeded by
(seed, epoch), and an interrupted epoch saves its permutation, running sums and RNG states,
so a resumed run takes the same steps as one that never stopped.

Across several processes (distributed.py says how): each rank takes its share of every
global batch of the same permutation, DDP averages the gradients, the epoch's sums are
added over the ranks, validation is split between them, and rank 0 alone saves.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cnnkit.config import Config
from cnnkit.data.augment import train_transform
from cnnkit.data.memory import DataSplits, ImageTensors, Normalizer
from cnnkit.data.stream import StreamedData, epoch_steps, stream_batches
from cnnkit.device import ExecutionContext, free_memory_bytes, tune_allocator
from cnnkit.runs.checkpoint import checkpoint_payload, save_checkpoint
from cnnkit.runs.inference import batched_logits

from . import distributed
from .batches import epoch_batches, rank_batch
from .hooks import Hook
from .optim import build_optimizer, build_schedule
from .stages import Stage


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C after saving a resumable last.pt."""

    def __init__(self, checkpoint: Path, epoch: int, step: int, steps: int):
        self.checkpoint, self.epoch, self.step, self.steps = checkpoint, epoch, step, steps
        super().__init__(
            f"interrupted at epoch {epoch + 1}, step {step}/{steps}; saved {checkpoint}"
        )


@dataclass
class TrainState:
    """Where a run is. Saved in last.pt; enough to continue exactly."""

    stage: str = "train"
    epoch_offset: int = 0  # epochs of earlier stages
    epoch: int = 0  # epochs completed in this stage
    step: int = 0  # next step inside the current epoch; > 0 only after an interruption
    best: float | None = None  # best monitored value so far (all stages)
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    elapsed: float = 0.0  # training seconds so far, for the time budget
    history: list[dict] = field(default_factory=list)
    stop_reason: str | None = None
    # Mid-epoch only: the epoch's permutation, the running sums and the RNG states.
    perm: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    rng: dict | None = None
    epoch_seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler ending the job) asks the loop to stop at the
    next step boundary, where it saves; a second Ctrl-C aborts at once. Not in a
    distributed worker: its launcher passes the signal on as well, and kills it if it
    takes too long. One lives through all stages of a run: a request made at the end of
    one stage stops the next at its first step."""

    def __init__(self, hooks: list[Hook], repeat_aborts: bool = True):
        self.requested = False
        self.hooks = hooks
        self.repeat_aborts = repeat_aborts

    def _handler(self, signum, frame):
        if self.requested:
            if self.repeat_aborts and signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = " (press again to abort)" if self.repeat_aborts else ""
        for h in self.hooks:
            h.message(f"{name}: saving a resumable checkpoint{again}...")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals can only be handled in the main thread
            return
        previous = {sig: signal.signal(sig, self._handler) for sig in _STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _seed_epoch(seed: int, epoch: int, generator: torch.Generator) -> None:
    # Large odd multiplier: (seed, epoch) pairs never collide for realistic values.
    base = seed * 1_000_003 + epoch
    torch.manual_seed(base)  # dropout and other layers draw from the global RNG
    generator.manual_seed(base + 1)  # shuffling and augmentation


def _seed_rank(seed: int, epoch: int, rank: int, generator: torch.Generator) -> None:
    """After the shared permutation, each rank's own augmentation and dropout draws: the
    same stream on every rank would augment the k-th image of every share alike."""
    base = (seed * 1_000_003 + epoch) * 65_537 + rank + (1 << 40)  # apart from _seed_epoch's
    torch.manual_seed(base)
    generator.manual_seed(base + 1)


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _improved(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor.endswith("loss") else value > best


def _fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True  # the host: already where the data is (in memory or memory-mapped)
    return nbytes < free_memory_bytes(device) // 2


class _EpochClock:
    """Seconds of training since it was made. On a GPU, CUDA events recorded in the stream:
    the host queues steps ahead, so its own clock would stop before the GPU does. Elsewhere,
    the host's clock. ``seconds()`` waits for the GPU (the epoch's one sync)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def seconds(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.t0
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1000


def multilabel_loss(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Each image's binary cross-entropy, averaged over its labels (float32)."""
    return F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight, reduction="none"
    ).mean(1)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Right answers in a batch: images whose class is the top one; multi-label, the share
    of each image's yes/no decisions (probability 0.5) that are right, summed."""
    if labels.ndim == 2:
        return ((logits > 0) == (labels > 0.5)).float().mean(1).sum()
    return (logits.argmax(1) == labels).sum()


def mean_average_precision(probs: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Macro mAP over the labels with a positive image (evaluate/multilabel.py)."""
    from cnnkit.evaluate.multilabel import label_average_precisions

    return label_average_precisions(probs.numpy(), targets.numpy())[1]


def positive_weights(targets: torch.Tensor) -> torch.Tensor:
    """Multi-label --class-weights auto: each label's negatives per positive (at most 100),
    the weight of its positive term in the loss, so a rare label is not learnt as "never"."""
    positives = targets.float().sum(0)
    return ((len(targets) - positives) / positives.clamp_min(1)).clamp(1, 100)


def _check_multilabel(cfg, streamed) -> None:
    """Settings that have no multi-label meaning, refused in one line each."""
    if streamed is not None:
        raise ValueError("multi-label data is loaded into memory; --stream is not supported")
    if cfg.train.sampler == "balanced":
        raise ValueError(
            "--sampler balanced draws by class; with several labels per image use "
            "--class-weights auto (a weight per label) instead"
        )
    if cfg.optim.label_smoothing:
        raise ValueError("--label-smoothing is for one label per image; leave it at 0")


def _monitor(asked: str, has_val: bool, multilabel: bool) -> str:
    """The value that picks best.pt: multi-label runs watch the validation mAP where
    val_acc is asked (the default); without a validation split, the training value."""
    if multilabel and asked == "val_acc" and has_val:
        return "val_map"
    if asked == "val_map" and not multilabel:
        raise ValueError("--monitor val_map is for multi-label data; use val_acc or val_loss")
    return asked if has_val else asked.replace("val_", "train_").replace("train_map", "train_acc")


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Loss weights inverse to class frequency, 1 on average: n / (k * count)."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    return len(labels) / (num_classes * counts)


@dataclass
class _Setup:
    """What one stage trains with, prepared once by ``_prepare``."""

    model: nn.Module  # what is trained
    saved_model: nn.Module  # what the checkpoints save (the whole model, around a head)
    forward: Callable[[torch.Tensor], torch.Tensor]  # training: in DDP, compiled if asked
    eval_forward: Callable[[torch.Tensor], torch.Tensor]  # validation: no DDP (no collectives)
    train: ImageTensors  # on the device when it fits there, else in host memory
    resident: bool
    val: ImageTensors | None  # on the device: this rank's share of the validation split
    val_size: int  # images in the whole validation split
    normalizer: Normalizer
    augment: Callable | None
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # shuffling and augmentation
    monitor: str  # the value that picks best.pt
    loss_weights: torch.Tensor | None
    pos_weight: torch.Tensor | None  # multi-label --class-weights auto: per label
    sample_weights: torch.Tensor | None  # balanced sampling: each image's chance
    batch_size: int  # the global batch
    steps: int  # per epoch
    world: distributed.World
    streamed: StreamedData | None = None  # train (and val) streamed from shards


def _prepare(
    model: nn.Module, saved_model: nn.Module, data: DataSplits, cfg: Config, ctx, stage: Stage
) -> _Setup:
    device = ctx.device
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotune each conv once
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    world = ctx.world
    trained: nn.Module = model
    if world.distributed:
        # DDP broadcasts rank 0's weights and averages every step's gradients (gradient
        # buckets at PyTorch's defaults).
        device_ids = [device.index] if device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=device_ids)
    # Static shapes: one graph for the full batch and one for the short last batch, each
    # specialised, rather than a shape-generic graph that would then serve every batch.
    forward = torch.compile(trained, dynamic=False) if ctx.compile else trained
    eval_forward = forward
    if world.distributed:  # validation runs on shares of different sizes: no DDP
        eval_forward = torch.compile(model, dynamic=False) if ctx.compile else model
    # Data that fits stays on the device; a larger set stays in host (or mapped) memory and
    # each batch moves alone.
    resident = _fits_on(device, data.train.images.nbytes)
    train = data.train.to(device) if resident else data.train
    augment = None
    if not data.is_features:
        augment = train_transform(stage.augment, data.stored_size, data.shape[1:])
    streamed = data.streamed
    if streamed is None:
        steps = math.ceil(len(train) / cfg.train.batch_size)
    else:
        batch = rank_batch(cfg.train.batch_size, world)
        steps = epoch_steps(streamed.splits["train"], world.size, batch)
    optimizer = build_optimizer(model, cfg.optim, lr=stage.lr, param_groups=stage.param_groups)
    val, val_size = None, streamed.count("val") if streamed else 0
    if data.val is not None and len(data.val):
        val_size = len(data.val)
        mine = distributed.share(val_size, world)  # a slice: a memory-mapped split stays so
        val = ImageTensors(data.val.images[mine], data.val.labels[mine]).to(device)
    weights = pos_weight = None  # inverse class frequencies: weighted loss, balanced sampling
    if data.multilabel:
        _check_multilabel(cfg, streamed)
        if cfg.train.class_weights == "auto":
            pos_weight = positive_weights(train.labels).to(device)
    elif streamed is not None and cfg.train.sampler == "balanced":
        raise ValueError(
            "--sampler balanced draws from the whole set in memory; a streamed data set is "
            "read in order: use --class-weights auto instead"
        )
    if not data.multilabel and (
        cfg.train.class_weights == "auto" or cfg.train.sampler == "balanced"
    ):
        labels = train.labels
        if streamed is not None:  # the index's counts stand for the labels
            counts = streamed.splits["train"].class_counts
            labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        weights = class_weights(labels, len(data.classes))
    return _Setup(
        model=model,
        saved_model=saved_model,
        forward=forward,
        eval_forward=eval_forward,
        train=train,
        resident=resident,
        val=val,
        val_size=val_size,
        normalizer=Normalizer(data.mean, data.std, device, crop=data.input_size),
        augment=augment,
        optimizer=optimizer,
        schedule=build_schedule(optimizer, cfg.optim, stage.epochs, steps),
        generator=torch.Generator(device=device),
        # Without a validation split, best.pt follows the training metrics (and says so).
        monitor=_monitor(cfg.train.monitor, bool(val_size), data.multilabel),
        loss_weights=(
            weights.to(device)
            if weights is not None and cfg.train.class_weights == "auto"
            else None
        ),
        pos_weight=pos_weight,
        sample_weights=weights[train.labels].to(device)
        if cfg.train.sampler == "balanced"
        else None,
        batch_size=cfg.train.batch_size,
        steps=steps,
        world=world,
        streamed=streamed,
    )


def _restore(
    setup: _Setup, stage: Stage, previous: TrainState | None, resume: dict | None, device
) -> TrainState:
    """The state to start from: an interrupted run's, or a fresh one carrying on from the
    stage before (its history and best value)."""
    if resume is not None:
        setup.optimizer.load_state_dict(resume["optimizer"])
        setup.schedule.load_state_dict(resume["schedule"])
        state = TrainState(**resume["state"])
        if state.sums is not None:
            # The sums saved are the whole epoch's so far: rank 0 carries them on, the
            # others start from zero (the end of the epoch adds them up).
            sums = state.sums if setup.world.is_main else torch.zeros_like(state.sums)
            state.perm, state.sums = state.perm.to(device), sums.to(device)
        return state
    state = TrainState(stage=stage.name)
    if previous is not None:
        state.history, state.elapsed = list(previous.history), previous.elapsed
        state.best, state.best_epoch = previous.best, previous.best_epoch
        state.epoch_offset = len(previous.history)
    return state


def _epoch_order(setup: _Setup, state: TrainState, seed: int, number: int, device, hooks):
    """(the epoch's order of images, its running sums): drawn fresh from (seed, epoch), or
    an interrupted epoch's, with its RNG states, to continue exactly where it stopped."""
    world = setup.world
    if state.step:
        rng = state.rng.get("ranks", [state.rng])  # one state per rank (several processes)
        if len(rng) == world.size:
            _set_rng_state(rng[world.rank], setup.generator, device)
        else:  # the order of images is the saved one; the random draws cannot be
            _seed_rank(seed, number, world.rank, setup.generator)
            _tell(
                hooks,
                "message",
                f"resumed mid-epoch on {world.size} process(es) after saving on {len(rng)}: "
                "the rest of this epoch takes the same images in the same order, with other "
                "augmentation and dropout draws than an uninterrupted run",
            )
        return state.perm, state.sums
    _seed_epoch(seed, number, setup.generator)
    n = len(setup.train)
    if setup.sample_weights is None:
        perm = torch.randperm(n, generator=setup.generator, device=device)
    else:
        perm = torch.multinomial(
            setup.sample_weights, n, replacement=True, generator=setup.generator
        )
    if world.distributed:
        _seed_rank(seed, number, world.rank, setup.generator)
    return perm, torch.zeros(3, device=device)  # loss sum, correct, count


def _train_step(
    setup: _Setup,
    ctx: ExecutionContext,
    batch: tuple[torch.Tensor, torch.Tensor, float | torch.Tensor, int],
    sums: torch.Tensor,
    label_smoothing: float,
) -> None:
    """Forward, loss, backward, optimizer and schedule step; the loss and correct
    predictions are added to the on-device ``sums`` (no host sync here)."""
    x, y, divisor, size = batch
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    one = not setup.world.distributed
    with ctx.autocast():
        logits = setup.forward(x)
        if y.ndim == 2:  # multi-label: a sigmoid and binary cross-entropy per label
            per_image = multilabel_loss(logits, y, setup.pos_weight)
            loss = per_image.mean() if one else per_image.sum()
        else:
            loss = F.cross_entropy(
                logits,
                y,
                weight=setup.loss_weights,
                label_smoothing=label_smoothing,
                reduction="mean" if one else "sum",
            )
    if not one:
        # A share's part of the global batch's mean loss; x world size, which DDP's
        # gradient averaging divides back out.
        loss = loss * (setup.world.size / divisor)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimizer.step()
    setup.schedule.step()
    with torch.no_grad():
        # (the batch's mean loss x its images), or this share's part of it: summed over
        # the ranks, the same as one process adds
        sums[0] += loss.detach().float() * (len(y) if one else size / setup.world.size)
        sums[1] += correct(logits, y)
        sums[2] += len(y)


def _epoch_row(
    setup: _Setup, stage: Stage, number: int, sums: torch.Tensor, seconds: float, partial: bool
) -> dict:
    """metrics.csv's row for an epoch, from its device-side sums, added over the ranks (the
    epoch's host sync)."""
    loss_sum, correct, count = distributed.sum_values(sums.tolist(), setup.world)
    return {
        "epoch": number + 1,
        "stage": stage.name,
        "train_loss": loss_sum / count,
        "train_acc": correct / count,
        "val_loss": None,
        "val_acc": None,
        "lr": setup.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_s": count / max(seconds, 1e-9),
        "partial": partial,
    }


def _validate(setup: _Setup, ctx: ExecutionContext, row: dict) -> None:
    """Validation loss and accuracy. Each rank takes its share of the split (no image
    twice, none left out) and the sums are added: the same numbers as one process."""
    if not setup.val_size:
        return
    sums = [0.0, 0.0]
    scored = []  # multi-label: (logits, targets) of every validation image, for the mAP
    for images, labels in _val_parts(setup, ctx):
        logits = batched_logits(setup.eval_forward, images, setup.normalizer, ctx)
        labels = labels.to(logits.device)
        if labels.ndim == 2:
            sums[0] += multilabel_loss(logits, labels).sum().item()
            scored.append(torch.cat([logits.float(), labels.float()], 1))
        else:
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").item()
        sums[1] += float(correct(logits, labels))
    loss_sum, right = distributed.sum_values(sums, setup.world)
    row["val_loss"] = loss_sum / setup.val_size
    row["val_acc"] = right / setup.val_size
    if setup.train.labels.ndim == 2:  # every rank's share, in rank order: the mean AP
        k = setup.train.labels.shape[1]
        mine = torch.cat(scored) if scored else torch.zeros((0, 2 * k), device=ctx.device)
        both = distributed.gather_rows(mine, setup.world).cpu()
        k = both.shape[1] // 2
        row["val_map"] = mean_average_precision(both[:, :k].sigmoid(), both[:, k:])


def _val_parts(setup: _Setup, ctx: ExecutionContext):
    """This rank's validation images and labels: its share in memory, or its samples of
    the streamed split, a few evaluation batches at a time."""
    data, world = setup.streamed, setup.world
    if data is None:
        if setup.val is not None and len(setup.val):
            yield setup.val.images, setup.val.labels
        return
    plan = data.plan("val", world.rank, world.size)
    yield from stream_batches(plan, 4 * ctx.eval_batch, data.workers)


def _judge_epoch(state: TrainState, row: dict, monitor: str, patience: int | None) -> str:
    """Update the best value and the patience count; 'diverged', 'best' or 'kept'."""
    number = row["epoch"]
    if not math.isfinite(row["train_loss"]):
        state.stop_reason = "diverged"
        return "diverged"
    if _improved(row[monitor], state.best, monitor):
        state.best, state.best_epoch = row[monitor], number
        state.epochs_without_improvement = 0
        return "best"
    state.epochs_without_improvement += 1
    if patience and state.epochs_without_improvement >= patience:
        state.stop_reason = "early_stopping"
    return "kept"


def _save(setup: _Setup, state: TrainState, description: dict, path: Path, resumable: bool):
    train_state = None
    if resumable:
        train_state = {
            "optimizer": setup.optimizer.state_dict(),
            "schedule": setup.schedule.state_dict(),
            "state": state.to_dict(),
        }
    metrics = state.history[-1] if state.history else None
    epoch = state.epoch_offset + state.epoch
    payload = checkpoint_payload(
        description, setup.saved_model.state_dict(), epoch, metrics, train_state
    )
    save_checkpoint(path, payload)


def _save_interrupted(
    setup: _Setup, state: TrainState, description: dict, path: Path, perm, sums
) -> None:
    """last.pt of an epoch stopped at ``state.step``: its permutation, the sums so far over
    every rank, and each rank's RNG states; rank 0 writes it while the others wait."""
    world = setup.world
    state.perm = perm
    state.sums = torch.tensor(
        distributed.sum_values(sums.tolist(), world), dtype=sums.dtype, device=sums.device
    )
    rng = distributed.gather_objects(_rng_state(setup.generator, sums.device), world)
    state.rng = {"ranks": rng} if world.distributed else rng[0]
    if world.is_main:
        _save(setup, state, description, path, resumable=True)
    distributed.barrier(world)  # no rank ends (and is reaped) before the file is whole


def _stop_flags(
    stopper: StopOnSignal, budget: float | None, budget_start: float, step: int, world
) -> tuple[bool, bool]:
    """(stop and save, time budget spent): on one process, asked at every step; on several,
    every AGREE_EVERY steps, agreed by all (any rank's request stops them all)."""
    spent = bool(budget) and time.perf_counter() - budget_start > budget
    if not world.distributed:
        return stopper.requested, spent
    if step % distributed.AGREE_EVERY:
        return False, False
    requested, spent = distributed.any_rank([stopper.requested, spent], world)
    return requested, spent


def _tell(hooks: list[Hook], event: str, *args) -> None:
    for h in hooks:
        getattr(h, event)(*args)


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: Config,
    *,
    ctx: ExecutionContext,
    run_dir: Path,
    description: dict,
    hooks: list[Hook] = (),
    stage: Stage | None = None,
    previous: TrainState | None = None,
    resume: dict | None = None,
    checkpoint_model: nn.Module | None = None,
    stopper: StopOnSignal | None = None,
) -> TrainState:
    """Train ``model`` on ``data`` for one stage; write best.pt / last.pt into run_dir.

    ``ctx``: where and how to compute (device, precision, layout, compile). ``description``:
    what every checkpoint says of the run (runs.checkpoint.describe_run). ``previous``: the
    state at the end of an earlier stage (its history and best value carry on). ``resume``:
    the training state of an interrupted run. ``checkpoint_model``: what the checkpoints
    save, when ``model`` is a part of it (a head trained on cached backbone features).
    """
    tune_allocator()
    tc, device, hooks, world = cfg.train, ctx.device, list(hooks), ctx.world
    stage = stage or Stage(epochs=tc.epochs, augment=cfg.data.augment, lr=cfg.optim.lr)
    setup = _prepare(model, checkpoint_model or model, data, cfg, ctx, stage)
    state = _restore(setup, stage, previous, resume, device)
    total_epochs, steps = state.epoch_offset + stage.epochs, setup.steps
    last, label = run_dir / "last.pt", "" if stage.name == "train" else f"{stage.name} "
    info = {"epochs": total_epochs, "steps": steps, "monitor": setup.monitor, "stage": stage.name}
    if resume is not None:  # the step training continues from, counted over all epochs
        info["resumed_step"] = (state.epoch_offset + state.epoch) * steps + state.step
    _tell(hooks, "on_train_start", info)
    budget_start = time.perf_counter() - state.elapsed
    stopper = stopper or StopOnSignal(hooks, repeat_aborts=not world.distributed)
    # With torch.compile, the first step of each fit() call compiles, and so does the first
    # short last batch: their time is reported apart (in the row of the epoch they fall in)
    # as well as counted in the training time.
    compiling = set()
    if ctx.compile:
        compiling = {state.step} | ({steps - 1} if len(setup.train) % setup.batch_size else set())
    compile_seconds = None

    with stopper.installed():
        while state.epoch < stage.epochs and state.stop_reason is None:
            number = state.epoch_offset + state.epoch  # 0-based, counted across stages
            perm, sums = _epoch_order(setup, state, tc.seed, number, device, hooks)
            _tell(hooks, "on_epoch_start", number, total_epochs, steps, state.step)
            model.train()
            clock, partial, step, begun = _EpochClock(device), False, state.step, state.step
            batches = epoch_batches(setup, perm, number, state.step, tc.seed, device)
            # in memory an epoch has `steps` steps; a stream's ends when every rank ran out
            in_memory, ran_out = setup.streamed is None, False
            while not ran_out and (step < steps or not in_memory):
                interrupt, spent = _stop_flags(stopper, tc.time_budget, budget_start, step, world)
                if spent and step > begun:  # the epoch ends early, after at least one step
                    partial, state.stop_reason = True, "time_budget"
                    break
                if interrupt:  # save where the epoch is, then stop
                    state.step = step
                    state.epoch_seconds += clock.seconds()
                    state.elapsed = time.perf_counter() - budget_start
                    _save_interrupted(setup, state, description, last, perm, sums)
                    _tell(hooks, "on_train_end", {"stopped": "interrupted"})
                    raise TrainingInterrupted(last, number, step, steps)
                batch = next(batches, None)
                if batch is None:
                    ran_out = True
                    break
                if step in compiling:  # time the step that compiles, apart
                    step_start = time.perf_counter()
                    _train_step(setup, ctx, batch, sums, cfg.optim.label_smoothing)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    compiling.discard(step)
                    compile_seconds = (compile_seconds or 0.0) + time.perf_counter() - step_start
                else:
                    _train_step(setup, ctx, batch, sums, cfg.optim.label_smoothing)
                _tell(hooks, "on_step", step, sums)
                step += 1
            ran_out = ran_out or step >= steps
            if ran_out and _stop_flags(stopper, tc.time_budget, budget_start, 0, world)[1]:
                state.stop_reason = "time_budget"  # spent in the epoch's last step

            # ---- end of epoch: one host sync (the clock waits for the queued steps), the
            # training sums, then validation.
            seconds = state.epoch_seconds + clock.seconds()
            row = _epoch_row(setup, stage, number, sums, seconds, partial)
            if compile_seconds is not None:
                row["compile_seconds"], compile_seconds = compile_seconds, None
            _validate(setup, ctx, row)
            row = distributed.from_main(row, world)  # one row, so one decision, on all ranks
            state.epoch, state.step = state.epoch + 1, 0
            state.perm = state.sums = state.rng = None
            state.epoch_seconds = 0.0
            state.elapsed = time.perf_counter() - budget_start
            state.history.append(row)
            verdict = _judge_epoch(state, row, setup.monitor, tc.patience)
            if verdict == "diverged":
                _tell(
                    hooks,
                    "message",
                    f"training loss is {row['train_loss']} at {label}epoch {number + 1}: "
                    "the run diverged; lower the learning rate (--lr).",
                )
            elif verdict == "best" and world.is_main:
                _save(setup, state, description, run_dir / "best.pt", resumable=False)
            if world.is_main:
                _save(setup, state, description, last, resumable=True)
            _tell(hooks, "on_epoch_end", row)

    state.stop_reason = state.stop_reason or "completed"
    summary = {"stopped": state.stop_reason, "stage": stage.name, "best_epoch": state.best_epoch}
    _tell(hooks, "on_train_end", {**summary, setup.monitor: state.best})
    return state
