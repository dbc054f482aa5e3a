"""Every setting of a training run, with its default, on one screen.

A run's config is built from these defaults, then a YAML recipe (``--config``), then CLI
flags or ``--set section.key=value``. The resolved config is saved as the run's
``config.yaml`` and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist"  # built-in (mnist, fashion-mnist, cifar10, cifar100), folder or CSV
    data_dir: str | None = None  # searched before $CNNKIT_DATA and the cache
    val_split: float = 0.1  # stratified, seeded share held out for validation
    test_split: float = 0.1  # share held out for testing (folders without a test/ split)
    limit: int | None = None  # train on a stratified subset of at most this many images
    augment: str = "auto"  # auto | none | affine | crop-flip | flip | photo (data.augment)
    image_size: int | None = None  # folders: model input size (default: backbone's, or 128)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "seed-cnn"  # registered name, timm architecture, timm:<arch>, or a layer spec
    pretrained: bool = False  # ImageNet weights from the library's hub/cache (or a package)
    weights: str | None = None  # a local state-dict file for the backbone
    head: str | None = None  # extra head layers before the classifier, e.g. fc256-drop0.5


@dataclass(frozen=True)
class FinetuneConfig:
    """Pretrained backbones: stage 1 trains the head on the frozen backbone for
    train.epochs; stage 2 unfreezes and trains everything for finetune_epochs."""

    freeze: bool = False  # keep the backbone frozen throughout (stage 1 only)
    unfreeze: int | None = None  # stage 2 unfreezes the last N blocks (default: all)
    finetune_epochs: int = 2
    finetune_lr: float | None = None  # stage-2 learning rate (default: optim.lr / 10)
    layer_decay: float = 0.7  # each earlier block learns at this times the next one's rate
    cache_features: bool = True  # stage 1 without augmentation: backbone features once


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"  # adam | adamw | sgd (Nesterov momentum)
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | onecycle | cosine
    warmup_epochs: float = 0.0  # linear warm-up before the cosine schedule
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int | str = 32  # or "auto": the largest that fits (train/autobatch.py)
    seed: int = 0
    device: str = "auto"  # auto (cuda, mps, cpu) | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto (bf16 where the GPU or CPU has it natively) | fp32 | bf16
    compile: bool = False  # torch.compile the model (pays off on long GPU runs)
    patience: int | None = None  # stop after this many epochs without improvement
    monitor: str = "val_acc"  # val_acc | val_loss: picks best.pt and drives early stopping
    time_budget: float | None = None  # seconds of training; stops cleanly when spent
    eval_batch_size: int = 1000
    class_weights: str = "none"  # none | auto (loss weights inverse to class frequency)
    sampler: str = "shuffle"  # shuffle | balanced (classes drawn equally often)


@dataclass(frozen=True)
class RunConfig:
    name: str | None = None  # default: <data>-<model>, numbered if it exists
    runs_dir: str = "runs"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return apply_overrides(cls(), flatten(d))


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# Flat names for CLI flags and keyword arguments: a field's own name, except the three
# 'name' fields, which are spelled as the user thinks of them.
FLAT_ALIASES = {"data": "data.name", "model": "model.name", "name": "run.name"}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def all_keys() -> dict[str, type]:
    """Every dotted key ('optim.lr') with its type."""
    keys = {}
    for section, klass in _section_classes().items():
        for name, typ in typing.get_type_hints(klass).items():
            keys[f"{section}.{name}"] = typ
    return keys


def resolve_key(key: str) -> str:
    """'lr' or 'optim.lr' -> 'optim.lr'; unknown keys get an error listing the valid ones."""
    key = key.replace("-", "_")
    keys = all_keys()
    if key in keys:
        return key
    if key in FLAT_ALIASES:
        return FLAT_ALIASES[key]
    matches = [k for k in keys if k.split(".")[1] == key and k not in FLAT_ALIASES.values()]
    if len(matches) == 1:
        return matches[0]
    raise KeyError(f"unknown setting '{key}'; valid settings: {', '.join(keys)}")


def flatten(d: dict[str, Any]) -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}; flat keys pass through."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a value (often a CLI string) to the field's type, or explain why not."""
    args = typing.get_args(typ)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"setting '{key}' cannot be empty")
    if int in args and str in args and isinstance(value, str) and value.lower() == "auto":
        return "auto"  # a number or 'auto' (train.batch_size)
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except ValueError:
        kind = base.__name__ + (" or 'auto'" if str in args and base is int else "")
        raise ValueError(f"setting '{key}' must be {kind}, got {value!r}") from None


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A new Config with ``overrides`` ({'lr': '0.01', 'train.epochs': 3}) applied."""
    keys = all_keys()
    per_section: dict[str, dict[str, Any]] = {}
    for raw_key, value in overrides.items():
        key = resolve_key(raw_key)
        section, name = key.split(".")
        per_section.setdefault(section, {})[name] = _coerce(key, value, keys[key])
    changes = {
        section: dataclasses.replace(getattr(config, section), **values)
        for section, values in per_section.items()
    }
    return dataclasses.replace(config, **changes)


RECIPES = Path(__file__).resolve().parent / "recipes"


def recipe_names() -> list[str]:
    """The recipes that ship with cnnkit (``--config mnist-fast``)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe (a file, or the name of a shipped recipe) as dotted overrides
    (unknown keys are an error)."""
    path = Path(path)
    if not path.exists() and (RECIPES / f"{path}.yaml").exists():
        path = RECIPES / f"{path}.yaml"
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(
            f"config file not found: {path} (shipped recipes: {', '.join(recipe_names())})"
        ) from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a recipe is a mapping of settings, e.g. 'optim: {{lr: 0.01}}'")
    flat = flatten(d)
    for key in flat:
        try:
            resolve_key(key)
        except KeyError as e:
            raise KeyError(f"{path}: {e.args[0]}") from None
    return flat


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


_CHOICES = {
    "optim.optimizer": ("adam", "adamw", "sgd"),
    "optim.schedule": ("constant", "onecycle", "cosine"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.monitor": ("val_acc", "val_loss"),
    "train.class_weights": ("none", "auto"),
    "train.sampler": ("shuffle", "balanced"),
}


def validate(config: Config) -> None:
    """Raise ValueError naming the setting and the valid values."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ValueError(f"{key} = {value!r}; choose one of: {', '.join(choices)}")
    checks = [
        ("data.val_split", 0 <= config.data.val_split < 1, "must be in [0, 1)"),
        ("data.limit", config.data.limit is None or config.data.limit > 0, "must be positive"),
        ("data.test_split", 0 <= config.data.test_split < 1, "must be in [0, 1)"),
        (
            "data.image_size",
            config.data.image_size is None or config.data.image_size >= 8,
            "must be at least 8 pixels",
        ),
        ("optim.lr", config.optim.lr > 0, "must be positive"),
        ("finetune.finetune_epochs", config.finetune.finetune_epochs >= 0, "must be >= 0"),
        (
            "finetune.unfreeze",
            config.finetune.unfreeze is None or config.finetune.unfreeze > 0,
            "must be positive (blocks to unfreeze)",
        ),
        ("finetune.layer_decay", 0 < config.finetune.layer_decay <= 1, "must be in (0, 1]"),
        ("optim.weight_decay", config.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.label_smoothing", 0 <= config.optim.label_smoothing < 1, "must be in [0, 1)"),
        ("optim.warmup_epochs", config.optim.warmup_epochs >= 0, "must be >= 0"),
        ("train.epochs", config.train.epochs > 0, "must be positive"),
        (
            "train.batch_size",
            config.train.batch_size == "auto" or config.train.batch_size > 0,
            "must be positive, or auto",
        ),
        ("train.eval_batch_size", config.train.eval_batch_size > 0, "must be positive"),
        (
            "train.patience",
            config.train.patience is None or config.train.patience > 0,
            "must be positive",
        ),
        (
            "train.time_budget",
            config.train.time_budget is None or config.train.time_budget > 0,
            "must be positive (seconds)",
        ),
    ]
    for key, ok, problem in checks:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            raise ValueError(f"{key} = {value!r} {problem}")
