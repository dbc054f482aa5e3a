"""Optimizers and learning-rate schedules (stepped once per batch)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnkit.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation parameters (1-D tensors): decaying them
    # only hurts, which is why timm and most recipes exclude them.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'; choose adam, adamw or sgd")


def lr_factor(cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "onecycle":
        # Linear up to the peak over the first 25% of training, then linear down to ~0:
        # the simple one-cycle shape that fast CIFAR/MNIST recipes use.
        peak = max(1, int(0.25 * total_steps))
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))
    if cfg.schedule == "cosine":
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule '{cfg.schedule}'; choose constant, onecycle or cosine")


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, total, steps_per_epoch)
    )
