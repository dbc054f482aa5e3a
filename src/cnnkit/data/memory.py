"""Data sets held in memory as uint8 tensors, and the fast batch path over them.

Images stay uint8 (N, C, H, W) until a batch is taken: 60,000 MNIST digits are 47 MB as
uint8 but 188 MB as float32, and converting only the batch keeps memory traffic low.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .augment import center_crop


@dataclass
class ImageTensors:
    """A labelled set of images: uint8 (N, C, H, W) and int64 labels (N,), or for a
    multi-label set float 0/1 targets (N, K)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        is_images = self.images.dtype == torch.uint8 and self.images.ndim == 4
        is_features = self.images.is_floating_point() and self.images.ndim == 2
        if not (is_images or is_features):
            raise ValueError(
                f"images must be uint8 (N, C, H, W) (or float features (N, D)), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageTensors:
        return ImageTensors(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> ImageTensors:
        return ImageTensors(self.images.to(device), self.labels.to(device))


@dataclass
class DataSplits:
    """Train / validation / test splits of one data set, with what a model needs to know."""

    name: str
    classes: list[str]
    train: ImageTensors
    val: ImageTensors | None
    test: ImageTensors | None
    mean: tuple[float, ...]  # per channel, in [0, 1] units (of the training split, or the
    std: tuple[float, ...]  # statistics a pretrained backbone was trained with)
    notes: list[str] = field(default_factory=list)
    input_size: tuple[int, int] | None = None  # model input (H, W) if images are stored larger
    files: dict[str, list[str]] | None = None  # folder data sets: each split's files, in order
    root: str | None = None  # ... relative to this folder
    is_features: bool = False  # images are backbone feature vectors (N, D)
    # Shards streamed for training (data/stream.py StreamedData): ``train`` then holds no
    # images (its shape says how they are decoded), ``val`` streams too.
    streamed: Any = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model input; (D,) for feature vectors."""
        if self.is_features:
            return tuple(self.train.images.shape[1:])
        c, h, w = self.train.images.shape[1:]
        return (c, *self.input_size) if self.input_size else (c, h, w)

    @property
    def multilabel(self) -> bool:
        """Several labels per image: the labels are an (N, K) 0/1 matrix."""
        return self.train.labels.ndim == 2

    @property
    def stored_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])

    def split(self, name: str) -> ImageTensors:
        part = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if part is None:
            raise ValueError(f"data set '{self.name}' has no '{name}' split")
        return part

    def count(self, name: str) -> int | None:
        """Images in a split (a streamed one's, from its index); None where there is none."""
        if self.streamed is not None:
            return self.streamed.count(name) if name in self.streamed.splits else None
        part = {"train": self.train, "val": self.val, "test": self.test}[name]
        return len(part) if part is not None else None

    def sizes(self) -> str:
        counts = {n: self.count(n) for n in ("train", "val", "test") if self.count(n) is not None}
        parts = [f"train {counts['train']:,}"]
        parts += [f"val {counts['val']:,}"] if "val" in counts else ["no val"]
        parts += [f"test {counts['test']:,}"] if "test" in counts else []
        return ", ".join(parts)


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, taken) with ``fraction`` of every class taken, seeded.

    Each class gives round(fraction * count) items, at least one when it has two or more,
    so a rare class still appears in a validation split.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    kept, taken = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = round(fraction * len(idx))
        if fraction > 0 and n == 0 and len(idx) >= 2:
            n = 1
        taken.append(idx[:n])
        kept.append(idx[n:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(taken)).values


def stratified_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of exactly ``size`` items (all of them if there are fewer), every
    class keeping its share to within one item, seeded.

    Each class gets the floor of its proportional share; the items left over go to the
    classes with the largest remainders (largest-remainder apportionment), so the total is
    exact, where rounding each class on its own can miss it by several items. Within a
    class the items are the ones ``stratified_split`` with the same seed keeps, so a subset
    changes little from the rounding-per-class one it replaces.
    """
    total = len(labels)
    if size >= total:
        return torch.arange(total)
    if size < 0:
        raise ValueError(f"subset size must be at least 0, got {size}")
    classes, counts = torch.unique(labels, return_counts=True)
    shares = counts.double() * size / total
    quota = shares.floor().long()
    left_over = size - int(quota.sum())
    # ties in the remainder go to the earlier class (a stable sort), for a seeded result
    by_remainder = torch.sort(shares - quota, descending=True, stable=True).indices
    quota[by_remainder[:left_over]] += 1
    g = torch.Generator().manual_seed(seed)
    kept = []
    for c, count, keep in zip(classes, counts.tolist(), quota.tolist(), strict=True):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        kept.append(idx[count - keep :])  # stratified_split keeps the tail of the permutation
    return torch.sort(torch.cat(kept)).values


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units.

    Chunks of 256 images are reduced in float32 (torch sums pairwise, so the error stays
    far below the 4 decimals kept) and accumulated in float64.
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(256):
        x = chunk.float()
        total += x.sum(dim=(0, 2, 3)).double()
        total_sq += x.square().sum(dim=(0, 2, 3)).double()
    n = images.numel() // c
    mean = total / n / 255
    std = (total_sq / n / 255**2 - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


class Normalizer:
    """uint8 batch -> float in [0, 1] -> (x - mean) / std, as two fused tensor ops.

    ``crop``: evaluation takes the centre (H, W) of images stored larger. Feature vectors
    (float, 2-D) pass through unchanged.
    """

    def __init__(self, mean, std, device: torch.device, crop: tuple[int, int] | None = None):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.inv_std = 1 / torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.crop = tuple(crop) if crop else None

    @staticmethod
    def to_unit(batch: torch.Tensor) -> torch.Tensor:
        if batch.is_floating_point():  # feature vectors: nothing to convert
            return batch
        return batch.float().mul_(1 / 255)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # feature vectors
            return x
        return x.sub_(self.mean).mul_(self.inv_std)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim == 2:  # feature vectors
            return batch
        x = self.to_unit(batch)
        if self.crop and tuple(x.shape[-2:]) != self.crop:
            x = center_crop(x, self.crop).contiguous()
        return self.normalize(x)
