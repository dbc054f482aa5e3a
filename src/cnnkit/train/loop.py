"""fit(): the training loop. It reads top to bottom: batches in, loss, backward, step,
schedule; at the end of each epoch, validate, checkpoint, tell the hooks, maybe stop.

The data path is the fast one: the whole training set sits on the device as uint8, a batch
is an index slice of it, converted and augmented there as whole-batch tensor operations.
Loss and accuracy are summed on the device; the host reads them once per epoch (and the
progress bar every few dozen steps), never once per step.

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
from cnnkit.data.augment import get_augment
from cnnkit.data.memory import DataSplits, Normalizer
from cnnkit.device import autocast, resolve_precision
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
class TrainState:
    """Where a run is. Saved in last.pt; enough to continue exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # next step inside the current epoch; > 0 only after an interruption
    best: float | None = None  # best monitored value so far
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


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: Config,
    *,
    device: torch.device,
    run_dir: Path,
    checkpoint_meta: dict,
    hooks: list[Hook] = (),
    resume: dict | None = None,
) -> TrainState:
    """Train ``model`` on ``data`` as ``cfg`` says; write best.pt / last.pt into run_dir."""
    tc, oc = cfg.train, cfg.optim
    dtype = resolve_precision(tc.precision, device)
    channels_last = device.type == "cuda"  # faster convolutions on GPUs; not on this CPU
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if tc.compile else model

    train = data.train.to(device)
    val = data.val.to(device) if data.val is not None and len(data.val) else None
    normalizer = Normalizer(data.mean, data.std, device)
    augment = get_augment(cfg.data.augment)
    batch_size, n = tc.batch_size, len(train)
    steps = math.ceil(n / batch_size)
    optimizer = build_optimizer(model, oc)
    schedule = build_schedule(optimizer, oc, tc.epochs, steps)
    generator = torch.Generator(device=device)
    # Without a validation split, best.pt follows the training metrics (and says so).
    monitor = tc.monitor if val is not None else tc.monitor.replace("val_", "train_")

    state = TrainState()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        state = TrainState(**resume["state"])
        if state.sums is not None:
            state.perm, state.sums = state.perm.to(device), state.sums.to(device)

    def checkpoint(path: Path, with_training_state: bool) -> None:
        payload = {
            **checkpoint_meta,
            "state_dict": model.state_dict(),
            "epoch": state.epoch,
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
        h.on_train_start({"epochs": tc.epochs, "steps": steps, "monitor": monitor})
    budget_start = time.perf_counter() - state.elapsed
    stopper = _StopOnSigint(list(hooks))

    with stopper.installed():
        while state.epoch < tc.epochs and state.stop_reason is None:
            epoch = state.epoch
            if state.step == 0:
                _seed_epoch(tc.seed, epoch, generator)
                perm = torch.randperm(n, generator=generator, device=device)
                sums = torch.zeros(3, device=device)  # loss sum, correct, count
            else:  # continue an interrupted epoch exactly where it stopped
                perm, sums = state.perm, state.sums
                _set_rng_state(state.rng, generator, device)
            for h in hooks:
                h.on_epoch_start(epoch, tc.epochs, steps, state.step)

            model.train()
            t0 = time.perf_counter()
            partial = False
            step = state.step
            while step < steps:
                if stopper.requested:
                    state.step, state.perm, state.sums = step, perm, sums
                    state.rng = _rng_state(generator, device)
                    state.epoch_seconds += time.perf_counter() - t0
                    state.elapsed = time.perf_counter() - budget_start
                    checkpoint(run_dir / "last.pt", with_training_state=True)
                    for h in hooks:
                        h.on_train_end({"stopped": "interrupted"})
                    raise TrainingInterrupted(run_dir / "last.pt", epoch, step, steps)

                index = perm[step * batch_size : (step + 1) * batch_size]
                x, y = normalizer.to_unit(train.images[index]), train.labels[index]
                if augment is not None:
                    x = augment(x, generator)
                x = normalizer.normalize(x)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, dtype):
                    logits = forward(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=oc.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()

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

            # ---- end of epoch: one host sync for the training sums, then validation
            seconds = state.epoch_seconds + time.perf_counter() - t0
            loss_sum, correct, count = sums.tolist()
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / count,
                "train_acc": correct / count,
                "val_loss": None,
                "val_acc": None,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
                "images_per_s": count / max(seconds, 1e-9),
                "partial": partial,
            }
            if val is not None:
                logits = batched_logits(
                    forward, val.images, normalizer, tc.eval_batch_size, dtype, channels_last
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
                        f"training loss is {row['train_loss']} at epoch {epoch + 1}: "
                        "the run diverged; lower the learning rate (--lr)."
                    )
            elif _improved(value, state.best, monitor):
                state.best, state.best_epoch = value, epoch + 1
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
            {"stopped": state.stop_reason, "best_epoch": state.best_epoch, monitor: state.best}
        )
    return state
