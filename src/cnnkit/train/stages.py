"""The stages of a run. From scratch: one. With a pretrained backbone: "head" trains a new
classifier on the frozen backbone (on features computed once when nothing is augmented),
then "finetune" unfreezes the backbone (or its last N blocks) with a lower, layer-wise
decaying learning rate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnnkit.config import Config
from cnnkit.data import DataSplits, ImageTensors
from cnnkit.data.memory import Normalizer
from cnnkit.data.stream import StreamPlan, rank_count, stream_batches
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
    """The same splits as pooled backbone features (N, D), computed once."""
    model.to(ctx.device).eval()
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    normalizer = Normalizer(data.mean, data.std, ctx.device, crop=data.input_size)

    world = ctx.world
    if data.streamed is not None:
        return _streamed_features(model, data, ctx, normalizer)
    parts = [p for p in (data.train, data.val) if p is not None]
    # Chunks of a few evaluation batches: the bar moves every second or so on a CPU.
    chunk = 4 * ctx.eval_batch
    # Over several processes each computes its share of every split, then all gather them.
    total = sum(len(range(len(p))[distributed.share(len(p), world)]) for p in parts)
    with progress("backbone features", total, summary=False) as advance:

        def features(part: ImageTensors | None) -> ImageTensors | None:
            if part is None:
                return None
            images = part.images[distributed.share(len(part), world)]
            out = []
            for batch in images.split(chunk):
                out.append(batched_forward(model.features, batch, normalizer, ctx))
                advance(len(batch))
            mine = (
                torch.cat(out) if out else batched_forward(model.features, images, normalizer, ctx)
            )
            return ImageTensors(distributed.gather_rows(mine, world), part.labels)

        train, val = features(data.train), features(data.val)
    return DataSplits(
        data.name, data.classes, train, val, None, data.mean, data.std, is_features=True
    )


def _streamed_features(
    model: BackboneClassifier, data: DataSplits, ctx: ExecutionContext, normalizer: Normalizer
) -> DataSplits:
    """backbone_features of a streamed data set: each rank streams its samples of the
    train and val splits in index order; the features and labels are gathered."""
    world, streamed = ctx.world, data.streamed
    names = [s for s in ("train", "val") if s in streamed.splits]
    total = sum(rank_count(streamed.splits[s], world.rank, world.size) for s in names)
    parts = {}
    with progress("backbone features", total, summary=False) as advance:
        for name in names:
            plan = StreamPlan(
                streamed.splits[name],
                streamed.channels,
                streamed.size,
                seed=0,
                epoch=0,
                rank=world.rank,
                world_size=world.size,
                shuffle=False,
            )
            features, labels = [], []
            for images, batch_labels in stream_batches(plan, 4 * ctx.eval_batch, streamed.workers):
                features.append(batched_forward(model.features, images, normalizer, ctx))
                labels.append(batch_labels.to(ctx.device))
                advance(len(batch_labels))
            mine = torch.cat(features) if features else torch.empty(0, device=ctx.device)
            mine_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
            parts[name] = ImageTensors(
                distributed.gather_rows(mine, world),
                distributed.gather_rows(mine_labels.to(ctx.device), world).cpu(),
            )
    return DataSplits(
        data.name,
        data.classes,
        parts["train"],
        parts.get("val"),
        None,
        data.mean,
        data.std,
        is_features=True,
    )
