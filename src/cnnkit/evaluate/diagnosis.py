"""Reading the training curves in plain words: what went wrong and what to try.

Each verdict names the numbers it rests on. The thresholds are rules of thumb, chosen to be
conservative: a verdict should be worth acting on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

RISE = 0.10  # validation loss this far above its minimum counts as rising
GAP = 0.05  # train minus validation accuracy above this is a generalisation gap
FLAT = 0.05  # training loss falling by less than this share over the run is flat
LOW_ACCURACY = 0.85  # training accuracy below this at the end: the model underfits
STILL_FALLING = 0.10  # the last epoch cut the training loss by more than this share
CHANCE = 1.5  # accuracy below this many times 1/classes is no better than guessing
BLOW_UP = 3.0  # a training loss above this many times ln(classes) (guessing's loss) blew up


@dataclass
class Verdict:
    verdict: str  # diverging | stuck | flat | overfitting | underfitting | not-converged |
    # unnormalised-inputs | healthy
    summary: str
    evidence: dict[str, float] = field(default_factory=dict)
    remedies: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def diagnose(
    history: list[dict], preprocessing: dict | None = None, classes: int | None = None
) -> list[Verdict]:
    """Verdicts on a run's per-epoch metrics (metrics.csv rows); 'healthy' if none apply.
    ``classes``: how many, for telling a model that only guesses."""
    out: list[Verdict] = []
    if preprocessing is not None and (unnormalised := _unnormalised_inputs(preprocessing)):
        out.append(unnormalised)
    if not history:
        return out
    if diverging := _diverging(history):
        # a diverged curve says nothing about fit or convergence: stop at this verdict
        out.append(diverging)
        return out
    if classes and (stuck := _stuck(history, classes)):
        # a model that blew up and now guesses: "underfitting, raise the rate" would mislead
        out.append(stuck)
        return out
    if flat := _flat(history):
        out.append(flat)
    if overfitting := _overfitting(history):
        out.append(overfitting)
    # a flat loss already explains a low training accuracy
    if (underfitting := _underfitting(history)) and not flat:
        out.append(underfitting)
    # an overfitting or flat run is not helped by more epochs of the same
    if len(history) >= 2 and not (overfitting or flat) and (still := _not_converged(history)):
        out.append(still)
    if not out:
        out.append(_healthy(history))
    return out


def _train_losses(history: list[dict]) -> list[float]:
    return [r["train_loss"] for r in history]


def _has_validation(history: list[dict]) -> bool:
    return all(r.get("val_loss") is not None for r in history)


def _unnormalised_inputs(preprocessing: dict) -> Verdict | None:
    """Inputs fed in [0, 1] units: mean 0 and std 1 on every channel."""
    mean, std = preprocessing.get("mean", []), preprocessing.get("std", [])
    if not (mean and all(m == 0 for m in mean) and all(s == 1 for s in std)):
        return None
    return Verdict(
        "unnormalised-inputs",
        "inputs reach the model in raw [0, 1] units: no mean subtraction or scaling",
        {"mean": mean[0], "std": std[0]},
        [
            "normalise with the training set's per-channel mean and std (cnnkit does "
            "this unless the statistics were overridden)"
        ],
    )


def _diverging(history: list[dict]) -> Verdict | None:
    """A non-finite loss, or a final training loss well above its lowest."""
    train = _train_losses(history)
    last = history[-1]
    lowest = min(v for v in train if _finite(v)) if any(_finite(v) for v in train) else None
    bad = next(
        (
            r
            for r in history
            if not _finite(r["train_loss"])
            or (r.get("val_loss") is not None and not _finite(r["val_loss"]))
        ),
        None,
    )
    if not (
        bad is not None or (lowest is not None and train[-1] > 1.5 * lowest and train[-1] > 0.1)
    ):
        return None
    epoch = bad["epoch"] if bad else last["epoch"]
    value = bad["train_loss"] if bad else train[-1]
    return Verdict(
        "diverging",
        f"the training loss diverged: {value} at epoch {int(epoch)}"
        + (f" (lowest was {lowest:.4f})" if lowest is not None else ""),
        {"epoch": epoch, "train_loss": value, "lowest_train_loss": lowest},
        [
            "lower the learning rate (--lr), e.g. by 10x",
            "add warm-up (--schedule cosine --warmup-epochs 1)",
            "check the inputs for extreme values",
        ],
    )


def _stuck(history: list[dict], classes: int) -> Verdict | None:
    """Accuracy at chance to the end after a training loss far above guessing's: steps too
    large threw the weights where every input gets the same answer (dead ReLUs), and the
    loss settles back near ln(classes) while nothing is learnt."""
    last, chance = history[-1], 1 / classes
    finite = [r for r in history if _finite(r["train_loss"])]
    blown = max(finite, key=lambda r: r["train_loss"], default=None)  # the highest loss
    guessing = math.log(classes)
    accuracies = [last.get("train_acc"), last.get("val_acc")]
    if not (
        len(history) >= 2
        and blown is not None
        and blown["train_loss"] > BLOW_UP * guessing
        and all(a is None or a < CHANCE * chance for a in accuracies)
    ):
        return None
    peak = blown["train_loss"]
    return Verdict(
        "stuck",
        f"accuracy is stuck at chance (training {last['train_acc']:.2%} with {classes} "
        f"classes, where guessing gives {chance:.0%}) after the training loss blew up to "
        f"{peak:,.4g} at epoch {int(blown['epoch'])} (guessing's loss is {guessing:.2f}): the "
        "learning rate is too high",
        {"peak_train_loss": peak, "epoch": blown["epoch"], "train_acc": last["train_acc"]},
        [
            "lower the learning rate (--lr) by 10x or more; cnnkit lr-find suggests one",
            "add warm-up (--schedule cosine --warmup-epochs 1)",
        ],
    )


def _flat(history: list[dict]) -> Verdict | None:
    """The training loss fell by less than FLAT of its first value over the run."""
    train = _train_losses(history)
    if not (len(history) >= 2 and (train[0] - train[-1]) < FLAT * train[0]):
        return None
    return Verdict(
        "flat",
        f"the training loss barely moved: {train[0]:.4f} at epoch 1, {train[-1]:.4f} at "
        f"epoch {int(history[-1]['epoch'])}",
        {"first_train_loss": train[0], "last_train_loss": train[-1]},
        [
            "raise the learning rate (--lr)",
            "train longer (--epochs)",
            "use a bigger model",
            "check that the labels match the images",
        ],
    )


def _overfitting(history: list[dict]) -> Verdict | None:
    """Validation loss rising while training loss falls, or a train/validation accuracy gap."""
    if not _has_validation(history):
        return None
    train = _train_losses(history)
    last = history[-1]
    val = [r["val_loss"] for r in history]
    best = min(range(len(val)), key=val.__getitem__)
    rising = best < len(val) - 1 and val[-1] > (1 + RISE) * val[best] and train[-1] < train[best]
    gap = last["train_acc"] - last["val_acc"]
    if not (rising or gap > GAP):
        return None
    parts = []
    if rising:
        parts.append(
            f"validation loss rose from {val[best]:.4f} (epoch "
            f"{int(history[best]['epoch'])}) to {val[-1]:.4f} while training "
            f"loss fell from {train[best]:.4f} to {train[-1]:.4f}"
        )
    if gap > GAP:
        parts.append(
            f"training accuracy {last['train_acc']:.2%} vs validation "
            f"{last['val_acc']:.2%} (a gap of {gap * 100:.1f} points)"
        )
    return Verdict(
        "overfitting",
        "the model overfits: " + "; ".join(parts),
        {
            "best_val_loss": val[best],
            "best_val_epoch": history[best]["epoch"],
            "last_val_loss": val[-1],
            "train_val_accuracy_gap": gap,
        },
        [
            "add dropout (e.g. --model seed-cnn-dropout, or drop<P> tokens)",
            "augment the data (--augment affine / crop-flip / photo)",
            "use a smaller model",
            "get more data",
            "stop early (--patience 2): best.pt already keeps the best epoch",
        ],
    )


def _underfitting(history: list[dict]) -> Verdict | None:
    """Final training accuracy below LOW_ACCURACY."""
    last = history[-1]
    if not last["train_acc"] < LOW_ACCURACY:
        return None
    return Verdict(
        "underfitting",
        f"training accuracy is only {last['train_acc']:.2%} after {int(last['epoch'])} "
        "epochs: the model does not fit even the training data",
        {"last_train_acc": last["train_acc"]},
        [
            "train longer (--epochs)",
            "raise the learning rate (--lr)",
            "use a bigger model (more filters or layers)",
        ],
    )


def _not_converged(history: list[dict]) -> Verdict | None:
    """The last epoch still cut the training loss by over STILL_FALLING (and the validation
    loss fell too, if there is one)."""
    train = _train_losses(history)
    has_val = _has_validation(history)
    drop = (train[-2] - train[-1]) / train[-2] if train[-2] > 0 else 0.0
    val_falling = not has_val or history[-1]["val_loss"] < history[-2]["val_loss"]
    if not (drop > STILL_FALLING and val_falling):
        return None
    return Verdict(
        "not-converged",
        f"still improving: the last epoch cut the training loss by {drop:.0%}"
        + (" and the validation loss fell too" if has_val else ""),
        {"last_epoch_loss_drop": drop},
        ["train longer (--epochs, or --resume with a larger --epochs)"],
    )


def _healthy(history: list[dict]) -> Verdict:
    """No rule applied: the losses and, with validation, the accuracy and gap."""
    train = _train_losses(history)
    last = history[-1]
    summary = f"no problem found: training loss {train[0]:.4f} -> {train[-1]:.4f}"
    if _has_validation(history):
        summary += (
            f", validation accuracy {last['val_acc']:.2%} with a train/validation "
            f"gap of {(last['train_acc'] - last['val_acc']) * 100:.1f} points"
        )
    return Verdict("healthy", summary, {"last_train_loss": train[-1]})
