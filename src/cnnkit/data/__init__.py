"""Data sets: locate, verify, load into memory, split."""

from __future__ import annotations

from pathlib import Path

import torch

from .augment import get_augment
from .builtin import (
    BUILTINS,
    ChecksumError,
    DatasetNotFoundError,
    builtin,
    is_available,
    load_builtin,
    read_cifar,
    read_idx,
)
from .corrections import apply_to_builtin
from .folder import list_images, load_folder
from .memory import (
    DataSplits,
    ImageTensors,
    Normalizer,
    channel_stats,
    stratified_split,
    stratified_subset,
)

__all__ = [
    "BUILTINS",
    "ChecksumError",
    "DataSplits",
    "DatasetNotFoundError",
    "ImageTensors",
    "Normalizer",
    "builtin",
    "channel_stats",
    "get_augment",
    "is_available",
    "is_builtin",
    "list_images",
    "load_folder",
    "load_dataset",
    "read_cifar",
    "read_idx",
    "stratified_split",
    "stratified_subset",
]


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    val_split: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    corrections=None,
) -> DataSplits:
    """Load a built-in data set into memory with a stratified, seeded validation split.

    The validation images come out of the official training set; the official test set is
    kept whole and is never used for model selection. ``limit`` keeps a stratified subset of
    exactly that many training images (all of them if there are fewer; for quick experiments).
    ``corrections``: labels changed and images left out first (data/corrections.py).
    """
    if name not in BUILTINS and not _is_builtin_alias(name):
        if not Path(name).exists():
            raise FileNotFoundError(
                f"data set '{name}' is neither a built-in ({', '.join(BUILTINS)}) nor an "
                "existing folder or CSV file"
            )
        raise ValueError(f"'{name}' is a folder or file: load it with load_folder()")
    raw = load_builtin(name, data_dir)
    spec = builtin(name)
    train_images, train_labels = raw.train_images, raw.train_labels
    notes = []
    if corrections is not None:  # --relabel / --exclude, before the split
        keep, train_labels = apply_to_builtin(corrections, train_labels, raw.classes, name)
        train_images = train_images[keep]
        notes.append(corrections.describe())
    train = ImageTensors(
        torch.from_numpy(train_images.copy()), torch.from_numpy(train_labels.copy())
    )
    test = ImageTensors(
        torch.from_numpy(raw.test_images.copy()), torch.from_numpy(raw.test_labels.copy())
    )
    val = None
    if val_split > 0:
        keep, take = stratified_split(train.labels, val_split, seed)
        train, val = train.subset(keep), train.subset(take)
    if limit is not None and limit < len(train):
        train = train.subset(stratified_subset(train.labels, limit, seed))
        notes.append(f"training on a stratified subset of {len(train):,} images (limit={limit})")
    mean, std = channel_stats(train.images)
    return DataSplits(spec.name, raw.classes, train, val, test, mean, std, notes)


def _is_builtin_alias(name: str) -> bool:
    try:
        builtin(name)
        return True
    except KeyError:
        return False


def is_builtin(name: str) -> bool:
    """True for built-in data set names (and their aliases), False for paths."""
    return name in BUILTINS or _is_builtin_alias(name)
