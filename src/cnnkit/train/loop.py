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
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.config import Config
from cnnkit.data.augment import train_transform
from cnnkit.data.memory import DataSplits, Normalizer
from cnnkit.device import (
    autocast,
    free_memory_bytes,
    inference_batch_size,
    resolve_precision,
    tune_allocator,
    use_channels_last,
)
from cnnkit.inference import batched_logits
from cnnkit.train.checkpoint import save_checkpoint
from cnnkit.train.hooks import Hook
from cnnkit.train.optim import build_optimizer, build_schedule


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C after saving a resumable last.pt."""

    def __init__(self, checkpoint: Path, epoch: int, step: int, steps: int):
        self.checkpoint, self.epoch, self.step, self.steps = checkpoint, epoch, step, steps
        super().__init__(
            f"interrupted at epoch {epoch + 1}, step {step}/{steps}; saved {checkpoint}"
        )


@dataclass
class Stage:
    """One phase of a run. Training from scratch has one; fine-tuning a pretrained backbone
    has two: the head on the frozen backbone, then (part of) the backbone too."""

    name: str = "train"
    epochs: int = 5
    augment: str = "none"
    lr: float = 1e-3
    param_groups: list[dict] | None = None  # default: every trainable parameter at lr


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


class _StopOnSigint:
    """First Ctrl-C asks the loop to stop at the next step boundary (it then saves);
    a second one aborts at once."""

    def __init__(self, hooks: list[Hook]):
        self.requested = False
        self.hooks = hooks

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        for h in self.hooks:
            h.message("Ctrl-C: saving a resumable checkpoint (press again to abort)...")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals can only be handled in the main thread
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _seed_epoch(seed: int, epoch: int, generator: torch.Generator) -> None:
    # Large odd multiplier: (seed, epoch) pairs never collide for realistic values.
    base = seed * 1_000_003 + epoch
    torch.manual_seed(base)  # dropout and other layers draw from the global RNG
    generator.manual_seed(base + 1)  # shuffling and augmentation


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


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Loss weights inverse to class frequency, 1 on average: n / (k * count)."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    return len(labels) / (num_classes * counts)


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: Config,
    *,
    device: torch.device,
    run_dir: Path,
    checkpoint_meta: dict,
    hooks: list[Hook] = (),
    stage: Stage | None = None,
    previous: TrainState | None = None,
    resume: dict | None = None,
    checkpoint_model: nn.Module | None = None,
) -> TrainState:
    """Train ``model`` on ``data`` for one stage; write best.pt / last.pt into run_dir.

    ``previous``: the state at the end of an earlier stage (its history and best value
    carry on). ``resume``: the training state of an interrupted run. ``checkpoint_model``:
    what the checkpoints save, when ``model`` is a part of it (a head trained on cached
    backbone features).
    """
    tune_allocator()
    tc, oc = cfg.train, cfg.optim
    stage = stage or Stage(epochs=tc.epochs, augment=cfg.data.augment, lr=oc.lr)
    saved_model = checkpoint_model or model
    dtype = resolve_precision(tc.precision, device)
    channels_last = use_channels_last(model, device) and not data.is_features
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotune each conv once
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # Static shapes: one graph for the full batch and one for the short last batch, each
    # specialised, rather than a shape-generic graph that would then serve every batch.
    forward = torch.compile(model, dynamic=False) if tc.compile else model

    # Data that fits stays on the device; a larger set stays in host (or mapped) memory and
    # each batch moves alone.
    resident = _fits_on(device, data.train.images.nbytes)
    train = data.train.to(device) if resident else data.train
    val = data.val.to(device) if data.val is not None and len(data.val) else None
    normalizer = Normalizer(data.mean, data.std, device, crop=data.input_size)
    augment = None
    if not data.is_features:
        augment = train_transform(stage.augment, data.stored_size, data.shape[1:])
    batch_size, n = tc.batch_size, len(train)
    steps = math.ceil(n / batch_size)
    optimizer = build_optimizer(model, oc, lr=stage.lr, param_groups=stage.param_groups)
    schedule = build_schedule(optimizer, oc, stage.epochs, steps)
    generator = torch.Generator(device=device)
    # Without a validation split, best.pt follows the training metrics (and says so).
    monitor = tc.monitor if val is not None else tc.monitor.replace("val_", "train_")
    num_classes = len(data.classes)
    loss_weights = None
    if tc.class_weights == "auto":
        loss_weights = class_weights(train.labels, num_classes).to(device)
    sample_weights = None  # balanced sampling: each image drawn inversely to its class size
    if tc.sampler == "balanced":
        sample_weights = class_weights(train.labels, num_classes)[train.labels].to(device)

    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        state = TrainState(**resume["state"])
        if state.sums is not None:
            state.perm, state.sums = state.perm.to(device), state.sums.to(device)
    else:
        state = TrainState(stage=stage.name)
        if previous is not None:
            state.history, state.elapsed = list(previous.history), previous.elapsed
            state.best, state.best_epoch = previous.best, previous.best_epoch
            state.epoch_offset = len(previous.history)
    total_epochs = state.epoch_offset + stage.epochs
    label = "" if stage.name == "train" else f"{stage.name} "

    def checkpoint(path: Path, with_training_state: bool) -> None:
        payload = {
            **checkpoint_meta,
            "state_dict": saved_model.state_dict(),
            "epoch": state.epoch_offset + state.epoch,
            "metrics": state.history[-1] if state.history else None,
        }
        if with_training_state:
            payload["train_state"] = {
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "state": state.to_dict(),
            }
        save_checkpoint(path, payload)

    for h in hooks:
        h.on_train_start(
            {"epochs": total_epochs, "steps": steps, "monitor": monitor, "stage": stage.name}
        )
    budget_start = time.perf_counter() - state.elapsed
    stopper = _StopOnSigint(list(hooks))
    # With torch.compile, the first step of each fit() call compiles, and so does the first
    # short last batch: their time is reported apart (in the row of the epoch they fall in)
    # as well as counted in the training time.
    compiling = set()
    if tc.compile:
        compiling = {state.step} | ({steps - 1} if n % batch_size else set())
    compile_seconds = None

    with stopper.installed():
        while state.epoch < stage.epochs and state.stop_reason is None:
            epoch = state.epoch
            number = state.epoch_offset + epoch  # 0-based, counted across stages
            if state.step == 0:
                _seed_epoch(tc.seed, number, generator)
                if sample_weights is None:
                    perm = torch.randperm(n, generator=generator, device=device)
                else:
                    perm = torch.multinomial(
                        sample_weights, n, replacement=True, generator=generator
                    )
                sums = torch.zeros(3, device=device)  # loss sum, correct, count
            else:  # continue an interrupted epoch exactly where it stopped
                perm, sums = state.perm, state.sums
                _set_rng_state(state.rng, generator, device)
            for h in hooks:
                h.on_epoch_start(number, total_epochs, steps, state.step)

            model.train()
            clock = _EpochClock(device)
            partial = False
            step = state.step
            while step < steps:
                if stopper.requested:
                    state.step, state.perm, state.sums = step, perm, sums
                    state.rng = _rng_state(generator, device)
                    state.epoch_seconds += clock.seconds()
                    state.elapsed = time.perf_counter() - budget_start
                    checkpoint(run_dir / "last.pt", with_training_state=True)
                    for h in hooks:
                        h.on_train_end({"stopped": "interrupted"})
                    raise TrainingInterrupted(run_dir / "last.pt", number, step, steps)

                index = perm[step * batch_size : (step + 1) * batch_size]
                if resident:
                    x, y = normalizer.to_unit(train.images[index]), train.labels[index]
                else:
                    index = index.cpu()
                    x = normalizer.to_unit(train.images[index].to(device, non_blocking=True))
                    y = train.labels[index].to(device, non_blocking=True)
                if augment is not None:
                    x = augment(x, generator)
                x = normalizer.normalize(x)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                timed = step in compiling
                if timed:
                    step_start = time.perf_counter()
                with autocast(device, dtype):
                    logits = forward(x)
                    loss = F.cross_entropy(
                        logits, y, weight=loss_weights, label_smoothing=oc.label_smoothing
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if timed:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    compiling.discard(step)
                    compile_seconds = (compile_seconds or 0.0) + time.perf_counter() - step_start

                with torch.no_grad():  # on-device sums: no host sync here
                    sums[0] += loss.detach().float() * len(y)
                    sums[1] += (logits.argmax(1) == y).sum()
                    sums[2] += len(y)
                for h in hooks:
                    h.on_step(step, sums)
                step += 1
                if tc.time_budget and time.perf_counter() - budget_start > tc.time_budget:
                    partial, state.stop_reason = step < steps, "time_budget"
                    break

            # ---- end of epoch: one host sync (the clock waits for the queued steps), the
            # training sums, then validation.
            seconds = state.epoch_seconds + clock.seconds()
            loss_sum, correct, count = sums.tolist()
            row = {
                "epoch": number + 1,
                "stage": stage.name,
                "train_loss": loss_sum / count,
                "train_acc": correct / count,
                "val_loss": None,
                "val_acc": None,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
                "images_per_s": count / max(seconds, 1e-9),
                "partial": partial,
            }
            if compile_seconds is not None:
                row["compile_seconds"] = compile_seconds
                compile_seconds = None
            if val is not None:
                eval_batch = tc.eval_batch_size
                if not data.is_features:
                    eval_batch = inference_batch_size(eval_batch, data.shape[1:], device)
                logits = batched_logits(
                    forward, val.images, normalizer, eval_batch, dtype, channels_last
                )
                row["val_loss"] = F.cross_entropy(logits, val.labels).item()
                row["val_acc"] = (logits.argmax(1) == val.labels).float().mean().item()

            state.epoch, state.step = epoch + 1, 0
            state.perm = state.sums = state.rng = None
            state.epoch_seconds = 0.0
            state.elapsed = time.perf_counter() - budget_start
            state.history.append(row)

            value = row[monitor]
            if not math.isfinite(row["train_loss"]):
                state.stop_reason = "diverged"
                for h in hooks:
                    h.message(
                        f"training loss is {row['train_loss']} at {label}epoch "
                        f"{number + 1}: the run diverged; lower the learning rate (--lr)."
                    )
            elif _improved(value, state.best, monitor):
                state.best, state.best_epoch = value, number + 1
                state.epochs_without_improvement = 0
                checkpoint(run_dir / "best.pt", with_training_state=False)
            else:
                state.epochs_without_improvement += 1
                if tc.patience and state.epochs_without_improvement >= tc.patience:
                    state.stop_reason = "early_stopping"
            checkpoint(run_dir / "last.pt", with_training_state=True)
            for h in hooks:
                h.on_epoch_end(row)

    state.stop_reason = state.stop_reason or "completed"
    for h in hooks:
        h.on_train_end(
            {
                "stopped": state.stop_reason,
                "stage": stage.name,
                "best_epoch": state.best_epoch,
                monitor: state.best,
            }
        )
    return state
