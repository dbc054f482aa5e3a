"""Batched forward passes over uint8 images (validation, evaluation, prediction)."""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.data.memory import Normalizer
from cnnkit.device import autocast


@torch.inference_mode()
def batched_logits(
    model: nn.Module,
    images: torch.Tensor,
    normalizer: Normalizer,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """Float32 logits for uint8 images (N, C, H, W), on the images' device."""
    was_training = model.training
    model.eval()
    outputs = []
    for batch in images.split(batch_size):
        x = normalizer(batch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, dtype):
            outputs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)
