"""Data sets held in memory as uint8 tensors, and the fast batch path over them.

Images stay uint8 (N, C, H, W) until a batch is taken: 60,000 MNIST digits are 47 MB as
uint8 but 188 MB as float32, and converting only the batch keeps memory traffic low.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageTensors:
    """A labelled set of images: uint8 (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
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
    mean: tuple[float, ...]  # per channel, of the training split, in [0, 1] units
    std: tuple[float, ...]
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def split(self, name: str) -> ImageTensors:
        part = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if part is None:
            raise ValueError(f"data set '{self.name}' has no '{name}' split")
        return part

    def sizes(self) -> str:
        parts = [f"train {len(self.train):,}"]
        parts += [f"val {len(self.val):,}"] if self.val is not None else ["no val"]
        parts += [f"test {len(self.test):,}"] if self.test is not None else []
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


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (chunked: low memory)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).transpose(0, 1).reshape(c, -1) / 255
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    n = images.numel() // c
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


class Normalizer:
    """uint8 batch -> float in [0, 1] -> (x - mean) / std, as two fused tensor ops."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.inv_std = 1 / torch.tensor(std, device=device).view(1, -1, 1, 1)

    @staticmethod
    def to_unit(batch: torch.Tensor) -> torch.Tensor:
        return batch.float().mul_(1 / 255)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(self.mean).mul_(self.inv_std)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.to_unit(batch))
