"""The stages of a run. From scratch: one. With a pretrained backbone: "head" trains a new
classifier on the frozen backbone (on features computed once when nothing is augmented),
then "finetune" unfreezes the backbone (or its last N blocks) with a lower, layer-wise
decaying learning rate."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from cnnkit.config import Config
from cnnkit.data import DataSplits, ImageTensors
from cnnkit.data.memory import Normalizer
from cnnkit.data.stream import rank_count, stream_batches
from cnnkit.device import ExecutionContext
from cnnkit.models.pretrained import BackboneClassifier
from cnnkit.progress import progress
from cnnkit.runs.inference import batched_forward

from . import distributed
from .optim import decay_groups


@dataclass
class Stage:
    """One phase of a run. Training from scratch has one; fine-tuning a pretrained backbone
    has two: the head on the frozen backbone, then (part of) the backbone too."""

    name: str = "train"
    epochs: int = 5
    augment: str = "none"
    lr: float = 1e-3
    param_groups: list[dict] | None = None  # default: every trainable parameter at lr


def resolve_augment(cfg: Config, data: DataSplits, stage: str) -> str:
    """'auto': none for the built-in sets (the tutorials' recipe); for photos, none while
    the head trains on cached features, and 'photo' whenever the backbone learns ('affine',
    the Keras tutorial's, for grayscale folders)."""
    if cfg.data.augment != "auto":
        return cfg.data.augment
    built_in = data.streamed.from_builtin if data.streamed is not None else data.files is None
    if built_in:
        return "none"
    if stage == "head" and cfg.finetune.cache_features:
        return "none"
    if data.shape[0] == 1:  # grayscale digits or glyphs: a flip changes what they mean
        return "affine"
    return "photo"


def plan_stages(cfg: Config, data: DataSplits, model: nn.Module) -> list[Stage]:
    pretrained = cfg.model.pretrained or cfg.model.weights
    if not (isinstance(model, BackboneClassifier) and pretrained):
        return [Stage("train", cfg.train.epochs, resolve_augment(cfg, data, "train"), cfg.optim.lr)]
    stages = [Stage("head", cfg.train.epochs, resolve_augment(cfg, data, "head"), cfg.optim.lr)]
    ft = cfg.finetune
    if not ft.freeze and ft.finetune_epochs > 0:
        lr = ft.finetune_lr or cfg.optim.lr / 10
        stages.append(
            Stage("finetune", ft.finetune_epochs, resolve_augment(cfg, data, "finetune"), lr)
        )
    return stages


def layerwise_groups(
    model: BackboneClassifier, lr: float, decay: float, weight_decay: float
) -> list[dict]:
    """The head at ``lr``; each backbone block at ``decay`` times the rate of the one above
    (early layers hold generic features that need the least change)."""
    named = dict(model.backbone.named_parameters())
    blocks = model.blocks()
    groups = decay_groups(list(model.head.parameters()), lr, weight_decay)
    for depth, names in enumerate(reversed(blocks), start=1):
        groups += decay_groups([named[n] for n in names], lr * decay**depth, weight_decay)
    return groups


def prepare_stage(model: nn.Module, stage: Stage, cfg: Config) -> None:
    """Freeze / unfreeze the backbone as the stage needs, and set its parameter groups."""
    if not isinstance(model, BackboneClassifier):
        return
    if stage.name == "head":
        model.freeze_backbone()
    elif stage.name == "finetune":
        if cfg.finetune.unfreeze:
            model.freeze_backbone(keep_trainable_blocks=cfg.finetune.unfreeze)
        else:
            model.unfreeze()
        stage.param_groups = layerwise_groups(
            model, stage.lr, cfg.finetune.layer_decay, cfg.optim.weight_decay
        )


def backbone_features(
    model: BackboneClassifier, data: DataSplits, ctx: ExecutionContext
) -> DataSplits:
    """The same splits as pooled backbone features (N, D), computed once. Over several
    processes each computes its share of every split (its slice in memory, its samples of
    a stream), then all gather them, labels alongside."""
    model.to(ctx.device).eval()
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    normalizer = Normalizer(data.mean, data.std, ctx.device, crop=data.input_size)
    # Chunks of a few evaluation batches: the bar moves every second or so on a CPU.
    parts = _rank_parts(data, ctx.world, 4 * ctx.eval_batch)
    total = sum(count for count, _ in parts.values())
    with progress("backbone features", total, summary=False) as advance:
        features = {
            name: _gathered_features(model, chunks, normalizer, ctx, advance)
            for name, (_, chunks) in parts.items()
        }
    return DataSplits(
        data.name,
        data.classes,
        features["train"],
        features.get("val"),
        None,
        data.mean,
        data.std,
        is_features=True,
    )


def _rank_parts(data: DataSplits, world, chunk: int) -> dict[str, tuple[int, Iterable]]:
    """{split: (this rank's images in it, its (images, labels) chunks)} of train and val."""
    streamed = data.streamed
    if streamed is not None:
        return {
            name: (
                rank_count(streamed.splits[name], world.rank, world.size),
                stream_batches(
                    streamed.plan(name, world.rank, world.size), chunk, streamed.workers
                ),
            )
            for name in ("train", "val")
            if name in streamed.splits
        }
    parts = {}
    for name, part in (("train", data.train), ("val", data.val)):
        if part is not None:
            mine = distributed.share(len(part), world)
            images, labels = part.images[mine], part.labels[mine]
            parts[name] = (len(labels), zip(images.split(chunk), labels.split(chunk), strict=True))
    return parts


def _gathered_features(
    model: BackboneClassifier, chunks: Iterable, normalizer: Normalizer, ctx, advance
) -> ImageTensors:
    """The features and labels of this rank's chunks, gathered from every rank."""
    features, labels = [], []
    for images, chunk_labels in chunks:
        features.append(batched_forward(model.features, images, normalizer, ctx))
        labels.append(chunk_labels)
        advance(len(chunk_labels))
    mine = torch.cat(features) if features else torch.empty(0, device=ctx.device)
    mine_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    world = ctx.world
    return ImageTensors(
        distributed.gather_rows(mine, world),
        distributed.gather_rows(mine_labels.to(ctx.device), world).cpu(),
    )
