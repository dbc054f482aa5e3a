"""Every setting of a training run, with its default, on one screen.

A run's config is built from these defaults, then a YAML recipe (``--config``), then CLI
flags or ``--set section.key=value``. The resolved config is saved as the run's
``config.yaml`` and inside every checkpoint. Each setting carries its help text (also the
``cnnkit train`` flag's help), its choices and its check, next to its default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    check: tuple[Callable[[Any], bool], str] | None = None,
) -> Any:
    """A settings field: its default, help text, allowed values and a (predicate, problem)
    check, which validate() applies; None, where it is the default, means unset and passes."""
    metadata = {"help": help, "choices": choices, "check": check}
    return field(default=default, metadata=metadata)


# Checks shared by several settings: (predicate, the problem when it is false).
_POSITIVE = (lambda v: v > 0, "must be positive")
_AT_LEAST_ZERO = (lambda v: v >= 0, "must be >= 0")
_SHARE = (lambda v: 0 <= v < 1, "must be in [0, 1)")
# The experiment trackers --log can name (train/tracking.py).
TRACKERS = ("none", "tensorboard", "mlflow")


@dataclass(frozen=True)
class DataConfig:
    name: str = setting(
        "mnist",
        "built-in data set (mnist, fashion-mnist, cifar10, cifar100), or a folder "
        "or CSV list of images (a relative one is also looked up in $CNNKIT_DATA)",
    )
    data_dir: str | None = setting(
        None,
        "directory searched first for the data set's files (before $CNNKIT_DATA and the cache)",
    )
    val_split: float = setting(
        0.1,
        "stratified, seeded share of the training set held out for validation (default 0.1)",
        check=_SHARE,
    )
    test_split: float = setting(
        0.1, "share held out for testing when a folder has no test/ (default 0.1)", check=_SHARE
    )
    limit: int | None = setting(
        None, "train on a stratified subset of exactly N images (all if fewer)", check=_POSITIVE
    )
    # The presets of data/augment.py, plus auto (tests/test_config.py keeps the two in step;
    # importing cnnkit.data here would import torch into every layer above).
    augment: str = setting(
        "auto",
        "augmentation: auto (none for built-ins, photo for folders, affine for grayscale "
        "folders), none, affine, "
        "shift, crop-flip, flip, photo",
        choices=("auto", "none", "affine", "shift", "crop-flip", "flip", "photo"),
    )
    stream: bool = setting(
        False,
        "stream the images from WebDataset shards while training: a shard set (cnnkit "
        "datasets pack) always streams; a folder is packed to shards in the cache first "
        "(chosen by itself when its decoded images would not fit the disk)",
    )
    relabel: str | None = setting(
        None,
        "a CSV of label corrections (columns file, label; audit.csv from 'cnnkit datasets "
        "audit'): those images train with that class",
    )
    exclude: str | None = setting(
        None, "a CSV whose file column lists images to leave out (e.g. an edited audit.csv)"
    )
    task: str = setting(
        "auto",
        "one class per image (single) or a set of labels (multilabel); auto: a list with the "
        "header path,labels is multi-label; multilabel also reads a path,label list's cells "
        "as ';'-separated label sets",
        choices=("auto", "single", "multilabel"),
    )
    image_size: int | None = setting(
        None,
        "model input size for folder data sets (default: the backbone's; from scratch, "
        "inferred from the images: their median shorter side, 16 to 128)",
        check=(lambda v: v >= 8, "must be at least 8 pixels"),
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting(
        "seed-cnn",
        "model: a registered name (cnnkit models), a timm architecture or timm:<arch>, or a "
        "layer spec such as conv32-pool-conv64-pool-drop0.25-fc64",
    )
    pretrained: bool = setting(
        False,
        "start from ImageNet weights (timm's hub cache, or the offline EfficientNet-Lite0 package)",
    )
    weights: str | None = setting(None, "a local state-dict file for the backbone")
    head: str | None = setting(None, "extra head layers before the classifier, e.g. fc256-drop0.5")


@dataclass(frozen=True)
class FinetuneConfig:
    """Pretrained backbones: stage 1 trains the head on the frozen backbone for
    train.epochs; stage 2 unfreezes and trains everything for finetune_epochs."""

    freeze: bool = setting(False, "keep the pretrained backbone frozen: train the head only")
    unfreeze: int | None = setting(
        None,
        "fine-tuning unfreezes the last N blocks (default: all)",
        check=(lambda v: v > 0, "must be positive (blocks to unfreeze)"),
    )
    finetune_epochs: int = setting(
        2, "epochs of the fine-tuning stage after the head stage (default 2)", check=_AT_LEAST_ZERO
    )
    finetune_lr: float | None = setting(None, "fine-tuning learning rate (default: --lr / 10)")
    layer_decay: float = setting(
        0.7,
        "learning-rate factor per block towards the input (default 0.7)",
        check=(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    )
    cache_features: bool = setting(
        True,
        "head stage on backbone features computed once, when it has no augmentation (default true)",
    )


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = setting(
        "adam", "adam, adamw or sgd (Nesterov momentum)", choices=("adam", "adamw", "sgd")
    )
    lr: float = setting(1e-3, "learning rate (default 1e-3)", check=_POSITIVE)
    momentum: float = setting(0.9, "SGD momentum (default 0.9)")
    weight_decay: float = setting(
        0.0, "weight decay, not applied to biases and norm layers", check=_AT_LEAST_ZERO
    )
    schedule: str = setting(
        "constant",
        "learning-rate schedule: constant, onecycle, cosine",
        choices=("constant", "onecycle", "cosine"),
    )
    warmup_epochs: float = setting(
        0.0, "linear warm-up epochs before the cosine schedule", check=_AT_LEAST_ZERO
    )
    label_smoothing: float = setting(0.0, "label smoothing of the training loss", check=_SHARE)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(5, "number of epochs (default 5)", check=_POSITIVE)
    batch_size: int | str = setting(
        32,
        "batch size of each step over all processes (default 32), or auto: the largest "
        "power of two that fits the device's free memory, up to 256 on a GPU and 32 on a "
        "CPU (per process)",
        check=(lambda v: v == "auto" or v > 0, "must be positive, or auto"),
    )
    seed: int = setting(0, "random seed for the split, initialisation, shuffling, augmentation")
    device: str = setting("auto", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    precision: str = setting(
        "auto",
        "auto (bf16 autocast where the GPU or CPU computes in bf16 natively, "
        "else float32), fp32 or bf16",
        choices=("auto", "fp32", "bf16"),
    )
    compile: bool = setting(
        False,
        "torch.compile the model (true/false; pays off on long GPU runs); the compiling "
        "steps' time is reported apart",
    )
    patience: int | None = setting(
        None, "early stopping: epochs without improvement of --monitor", check=_POSITIVE
    )
    monitor: str = setting(
        "val_acc",
        "val_acc, val_loss or (multi-label) val_map: selects best.pt, drives early "
        "stopping; multi-label runs watch val_map where val_acc is asked",
        choices=("val_acc", "val_loss", "val_map"),
    )
    time_budget: float | None = setting(
        None,
        "stop training after this many seconds (the epoch ends early)",
        check=(lambda v: v > 0, "must be positive (seconds)"),
    )
    eval_batch_size: int = setting(
        1000, "batch size for validation and evaluation", check=_POSITIVE
    )
    class_weights: str = setting(
        "none",
        "none or auto (loss weights inverse to class frequency)",
        choices=("none", "auto"),
    )
    sampler: str = setting(
        "shuffle",
        "shuffle or balanced (every class drawn equally often)",
        choices=("shuffle", "balanced"),
    )
    calibrate: str = setting(
        "temperature",
        "after training, fit a temperature on the validation split and fold it into best.pt "
        "so its probabilities are calibrated (temperature), or leave them as trained (none)",
        choices=("temperature", "none"),
    )
    accept: float = setting(
        0.95,
        "after training, the share of validation images the 'unknown' threshold lets "
        "through (default 0.95); images scoring lower are answered 'unknown'",
        check=(lambda v: 0 < v < 1, "must be between 0 and 1, e.g. 0.95"),
    )
    threshold: float | None = setting(
        None,
        "multi-label: one probability threshold for every label (default: each label's "
        "own, the one with the best F1 on the validation split)",
        check=(lambda v: 0 < v < 1, "must be between 0 and 1, e.g. 0.5"),
    )
    sync_bn: bool = setting(
        False,
        "several processes: BatchNorm statistics over the whole global batch "
        "(SyncBatchNorm; CUDA GPUs only) instead of each process's share",
    )


@dataclass(frozen=True)
class RunConfig:
    name: str | None = setting(
        None, "run directory name under --runs-dir (default <data>-<model>, numbered if taken)"
    )
    runs_dir: str = setting("runs", "parent directory of runs (default runs)")
    log: str = setting(
        "none",
        "experiment trackers to log to: tensorboard, mlflow, or both comma-separated "
        "(tensorboard,mlflow); none by default",
        check=(
            lambda v: set(v.replace(" ", "").split(",")) <= set(TRACKERS),
            "names no tracker cnnkit knows; use none, tensorboard, mlflow or tensorboard,mlflow",
        ),
    )
    mlflow_uri: str | None = setting(
        None,
        "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs-dir>/mlflow.db)",
    )
    experiment: str | None = setting(
        None, "MLflow experiment of the run (default: cnnkit, or the tuning study's name)"
    )


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


def setting_fields() -> dict[str, dataclasses.Field]:
    """Every dotted key with its field: the default, and metadata help, choices and check."""
    return {
        f"{section}.{f.name}": f
        for section, klass in _section_classes().items()
        for f in dataclasses.fields(klass)
    }


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
    kind = base.__name__ + (" or 'auto'" if str in args and base is int else "")
    if isinstance(value, list | dict):
        # A recipe's YAML can hold a list or mapping where one value belongs; str() or
        # bool() would quietly accept it and float() fails with a TypeError.
        raise ValueError(f"setting '{key}' must be {kind}, got {value!r}")
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
    except (ValueError, TypeError):
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


def validate(config: Config) -> None:
    """Raise ValueError naming the setting and the valid values."""
    for key, setting_field in setting_fields().items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is None and setting_field.default is None:
            continue  # unset: the code that reads it picks the default
        if isinstance(value, float) and not math.isfinite(value):
            # nan fails every comparison, but inf passes "must be positive": neither is
            # a usable learning rate, momentum or share, so no float setting takes them.
            raise ValueError(f"{key} = {value!r} must be a finite number")
        choices, check = setting_field.metadata["choices"], setting_field.metadata["check"]
        if choices is not None and value not in choices:
            raise ValueError(f"{key} = {value!r}; choose one of: {', '.join(choices)}")
        if check is not None:
            ok, problem = check
            if not ok(value):
                raise ValueError(f"{key} = {value!r} {problem}")
