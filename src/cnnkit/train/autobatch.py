"""``--batch-size auto``: the largest sensible batch that fits in the device's memory.

The memory a training step needs grows with the batch through the activations autograd
keeps for the backward pass. Those are measured, not guessed: two small forward passes
(batches 2 and 4) count the bytes of every tensor saved for backward, which gives a fixed
part and a part per image. The batch is then the largest power of two up to a ceiling
(256 on a GPU; 32 on a CPU, where memory seldom limits and 32 is the batch the default
learning rates suit) whose activations, with a margin for the backward pass's
temporaries, fit in a share of the free memory. The learning rate is not
rescaled: a batch far from the recipe's may want a different one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnnkit.device import autocast, free_memory_bytes

GPU_CEILING, CPU_CEILING = 256, 32
GPU_SHARE, CPU_SHARE = 0.6, 0.25  # of the free memory; a CPU shares it with the data set
BACKWARD_MARGIN = 2.0  # gradients of the activations and kernel workspaces, on top


@dataclass(frozen=True)
class BatchChoice:
    batch_size: int
    per_image_bytes: int
    reason: str  # for the run header


def saved_activation_bytes(
    model: nn.Module, shape: tuple[int, ...], batch: int, device: torch.device, dtype
) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward pass of
    ``batch`` images of ``shape`` (C, H, W). Every parameter counts as trainable (the
    fine-tuning stage is the hungriest); the model's weights, buffers and flags are left as
    they were."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]  # batch-norm running statistics
    was_training = model.training
    x = torch.zeros(batch, *shape, device=device)
    try:
        for p in params:
            p.requires_grad_(True)
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, dtype):
            model(x)
    finally:
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
        model.train(was_training)
    return sum(storages.values())


def choose_batch_size(
    model: nn.Module,
    shape: tuple[int, ...],
    train_size: int,
    device: torch.device,
    dtype: torch.dtype,
    free_bytes: int | None = None,
) -> BatchChoice:
    """The largest power of two up to the device's ceiling (and a quarter of the training
    set, so that an epoch is at least a few steps) whose measured activations fit."""
    small, large = (saved_activation_bytes(model, shape, b, device, dtype) for b in (2, 4))
    per_image = max(1, (large - small) // 2)
    fixed = max(0, small - 2 * per_image)
    gpu = device.type == "cuda"
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    budget = int(free * (GPU_SHARE if gpu else CPU_SHARE))

    def fits(batch: int) -> bool:
        return BACKWARD_MARGIN * (fixed + batch * per_image) <= budget

    if not fits(1):
        raise MemoryError(
            f"one image needs about {BACKWARD_MARGIN * (fixed + per_image) / 2**20:,.0f} MiB "
            f"of activations but only {budget / 2**20:,.0f} MiB of {device} memory is free to "
            "use; use a smaller --image-size or model, or free memory"
        )
    device_ceiling = GPU_CEILING if gpu else CPU_CEILING
    ceiling = min(device_ceiling, max(1, train_size // 4))
    batch = 1
    while batch * 2 <= ceiling and fits(batch * 2):
        batch *= 2
    if batch * 2 <= ceiling:
        limit = "memory"
    elif ceiling < device_ceiling:
        limit = "training set's size (4 steps an epoch at least)"
    else:
        limit = f"{device.type.upper()} ceiling of {device_ceiling}"
    reason = (
        f"auto: {per_image / 2**20:.2f} MiB of activations per image, "
        f"{budget / 2**30:.1f} GiB to use; limited by the {limit}"
    )
    return BatchChoice(batch, per_image, reason)
