"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural
Networks", 2017; fastai's ``lr_find``): train from the model's initial weights for a
bounded number of steps while the learning rate grows exponentially from ``start_lr`` to
``end_lr``, record the loss of every step, and put the weights back.

The suggestion rule: the middle, on the log scale, of the longest uninterrupted descent
of the smoothed loss ("valley"). Past the middle the loss is close to turning back up;
before it, training is slower than it need be. The learning rate at the minimum of the
curve and the steepest point of the descent are reported too; a tenth of the minimum
(an older rule, fastai's lr_min) is 3 to 10 times higher on the tutorial CNN with Adam,
where it trained neither clearly better nor worse (docs/experiments.md). Limits: the
curve is noisy (one mini-batch per step), so the suggestion moves from seed to seed by a
factor of about 4 (docs/experiments.md shows the spread); it is a starting point for the
first stage of a run, made at the run's batch size for a constant schedule. A loss that
never fell (too few steps, or a start already too high) makes no suggestion worth
trusting, and the result says so.

Smoothing: an exponential moving average of the loss with bias correction (beta 0.98, as
fastai). The test stops early when the smoothed loss exceeds four times its minimum.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnkit.config import Config
from cnnkit.data import DataSplits
from cnnkit.device import ExecutionContext
from cnnkit.progress import progress

from .batches import epoch_batches
from .loop import TrainState, _epoch_order, _prepare, _train_step
from .optim import build_optimizer
from .stages import Stage, backbone_features, prepare_stage

BETA = 0.98  # smoothing of the loss
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum


@dataclass
class LRFindResult:
    lrs: list[float]  # the learning rate of each step
    losses: list[float]  # each step's training loss
    smoothed: list[float]
    suggestion: float  # the middle of the valley
    minimum_lr: float  # where the smoothed loss is lowest
    steepest_lr: float  # where it falls fastest (per decade of learning rate)
    stopped: str  # "diverged" (stopped early), "rose" (after its minimum) or "falling"
    seconds: float
    valley_lrs: list[float] = field(default_factory=list)  # the longest descent: first, last
    stage: str = "train"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        how = {
            "diverged": "stopped early: the loss diverged",
            "rose": "the loss rose after its minimum",
            "falling": "the loss was still falling at the end",
        }[self.stopped]
        lines = [
            f"range test: {len(self.lrs)} steps from {self.lrs[0]:.1e} to {self.lrs[-1]:.1e} "
            f"in {self.seconds:.1f}s ({how})",
            f"minimum of the smoothed loss at lr {self.minimum_lr:.2e}; steepest descent at "
            f"{self.steepest_lr:.2e}; suggestion: the middle of the longest descent",
        ]
        return "\n".join(lines + self.warnings)


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Exponential moving average with bias correction (early values are not pulled to 0)."""
    out, average = [], 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


def valley(smoothed: list[float]) -> tuple[int, int]:
    """(first, last) index of the longest uninterrupted descent of the smoothed loss.

    fastai's "valley" rule takes the longest decreasing subsequence instead; on the
    tutorial CNN that subsequence starts in the flat region before the descent (a curve
    that falls by a hair at a time) and suggests about 1e-4 for Adam, ten times below the
    tutorial's 1e-3. An uninterrupted descent starts where the loss really begins to fall."""
    best, i, n = (0, 0), 0, len(smoothed)
    while i < n:
        j = i
        while j + 1 < n and smoothed[j + 1] < smoothed[j]:
            j += 1
        if j - i > best[1] - best[0]:
            best = (i, j)
        i = j + 1
    return best


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float, float, list[str]]:
    """(suggestion, minimum lr, steepest lr, warnings) from the smoothed curve."""
    warnings = []
    first, last = valley(smoothed)
    suggestion = lrs[first + (last - first) // 2]  # the middle of the valley, in log lr
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    minimum = lrs[lowest]
    # The steepest fall per decade of lr before the minimum, skipping the first tenth of
    # the steps, where the average has seen few values.
    begin = max(1, len(lrs) // 10)
    slopes = [
        (smoothed[i] - smoothed[i - 1]) / (math.log10(lrs[i]) - math.log10(lrs[i - 1]))
        for i in range(begin, lowest + 1)
    ]
    steepest = lrs[begin + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else minimum
    if smoothed[lowest] > 0.9 * smoothed[0]:
        warnings.append(
            "warning: the loss fell by less than 10% over the test: the suggestion is unreliable "
            "(more --steps, a lower --start-lr, or check the data)"
        )
    if lowest >= len(lrs) - 1:
        warnings.append(
            "warning: the loss was still falling at the last step: raise --end-lr to find "
            "its minimum"
        )
    return suggestion, minimum, steepest, warnings


def range_test(
    model: nn.Module,
    data: DataSplits,
    cfg: Config,
    ctx: ExecutionContext,
    stage: Stage,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    quiet: bool = False,
) -> LRFindResult:
    """The range test on ``model`` for ``stage`` (the first stage of a run: the head on
    cached backbone features for a pretrained model); the weights, the buffers and which
    parameters train are the same afterwards as before."""
    if not 0 < start_lr < end_lr:
        raise ValueError(
            f"the range test needs 0 < --start-lr < --end-lr, got {start_lr:g} and {end_lr:g}"
        )
    if steps < 5:
        raise ValueError(f"--steps {steps} is too few for a curve; use 50 or more")
    if ctx.world.distributed:
        raise ValueError(
            "the learning-rate range test runs in one process: run 'cnnkit lr-find' first, "
            "then pass its suggestion as --lr to the run with --nproc"
        )
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = [p.requires_grad for p in model.parameters()]
    t0 = time.perf_counter()
    try:
        lrs, losses = _run(model, data, cfg, ctx, stage, (start_lr, end_lr, steps), quiet)
    finally:
        model.load_state_dict(saved)
        for p, flag in zip(model.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
    seconds = time.perf_counter() - t0
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    if len(finite) < 5:
        raise ValueError(
            f"the loss was not finite from the first steps on (start lr {start_lr:g}): lower "
            "--start-lr, or check the data"
        )
    lrs, losses = [lrs[i] for i in finite], [losses[i] for i in finite]
    smoothed = smooth(losses)
    suggestion, minimum, steepest, warnings = suggest(lrs, smoothed)
    first, last = valley(smoothed)
    if len(lrs) < steps:
        stopped = "diverged"
    else:  # ran every step: did the loss turn back up (or collapse to a plateau)?
        stopped = "rose" if smoothed[-1] > 1.1 * min(smoothed) else "falling"
    return LRFindResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestion,
        minimum_lr=minimum,
        steepest_lr=steepest,
        stopped=stopped,
        seconds=seconds,
        valley_lrs=[lrs[first], lrs[last]],
        stage=stage.name,
        warnings=warnings,
    )


def _run(model, data, cfg, ctx, stage, schedule, quiet) -> tuple[list[float], list[float]]:
    """Train with the exponential schedule; (lr, loss) of each step until the steps are
    done or the loss diverges."""
    start_lr, end_lr, steps = schedule
    prepare_stage(model, stage, cfg)
    trainee = model
    if stage.name == "head" and stage.augment == "none" and cfg.finetune.cache_features:
        data, ctx, trainee = backbone_features(model, data, ctx), ctx.for_features(), model.head
    setup = _prepare(trainee, model, data, cfg, ctx, stage)
    optimizer = build_optimizer(trainee, cfg.optim, lr=stage.lr, param_groups=stage.param_groups)
    setup.optimizer = optimizer
    # Each group keeps its ratio to the stage's lr (layer-wise decay when fine-tuning); the
    # top group's lr goes from start_lr to end_lr in `steps` steps.
    growth = (end_lr / start_lr) ** (1 / (steps - 1))
    setup.schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: start_lr / stage.lr * growth ** min(i, steps - 1)
    )
    lrs, losses, best, average = [], [], math.inf, 0.0
    state, epoch, batches = TrainState(stage=stage.name), 0, iter(())
    model.train()
    with progress("lr-find", steps, unit="steps", quiet=quiet) as advance:
        while len(losses) < steps:
            batch = next(batches, None)
            if batch is None:  # the next pass over the data, shuffled by (seed, pass)
                perm, _ = _epoch_order(setup, state, cfg.train.seed, epoch, ctx.device, [])
                batches = epoch_batches(setup, perm, epoch, 0, cfg.train.seed, ctx.device)
                epoch += 1
                continue
            lr = max(g["lr"] for g in optimizer.param_groups)
            sums = torch.zeros(3, device=ctx.device)
            _train_step(setup, ctx, batch, sums, cfg.optim.label_smoothing)
            loss_sum, _, count = sums.tolist()  # one sync a step: the curve needs each loss
            loss = loss_sum / max(count, 1)
            lrs.append(lr)
            losses.append(loss)
            advance(1)
            if not math.isfinite(loss):
                break
            average = BETA * average + (1 - BETA) * loss
            smoothed = average / (1 - BETA ** len(losses))
            best = min(best, smoothed)
            if smoothed > DIVERGED * best:
                break
    return lrs, losses


def plot_range_test(result: LRFindResult, path: str | Path, title: str = "") -> Path:
    """Smoothed loss against the learning rate (log scale), the suggestion marked."""
    from cnnkit.evaluate.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses, color="0.85", lw=0.6, label="loss of each step")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", label="smoothed loss")
    for lr, style, label in (
        (result.suggestion, "tab:red", f"suggested lr {result.suggestion:.2e}"),
        (result.minimum_lr, "0.4", f"minimum {result.minimum_lr:.2e}"),
    ):
        ax.axvline(lr, color=style, ls="--", lw=1, label=label)
    if result.valley_lrs:
        ax.axvspan(*result.valley_lrs, color="tab:red", alpha=0.07, label="longest descent")
    ax.set_xscale("log")
    low, high = min(result.smoothed), result.smoothed[0]
    ax.set_ylim(low - 0.1 * (high - low + 1e-9), max(high, low) * 1.3 + 1e-9)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title or f"learning-rate range test ({result.stage} stage)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def save_range_test(result: LRFindResult, folder: Path, title: str = "") -> tuple[Path, Path]:
    """lr_find.png and lr_find.json in ``folder`` (a run's directory)."""
    plot = plot_range_test(result, folder / "lr_find.png", title)
    record = folder / "lr_find.json"
    record.write_text(json.dumps(result.to_dict(), indent=2))
    return plot, record
