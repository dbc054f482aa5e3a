"""A model's layers with the shape of what each one outputs and its parameter count, for an
input size: the table ``cnnkit models NAME`` prints (Keras's ``model.summary()``).

Written here rather than taken from torchinfo: forward hooks on the leaf modules are a few
lines, and the rows keep cnnkit's own layer names (the ones ``--layer`` and the layer spec
use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerRow:
    name: str  # the module's dotted name, e.g. features.0
    kind: str  # its class and main arguments, e.g. Conv2d(1, 32, 3x3)
    output: tuple[int, ...]  # without the batch dimension
    params: int


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        k = "x".join(map(str, m.kernel_size))
        stride = f", stride {m.stride[0]}" if m.stride != (1, 1) else ""
        return f"Conv2d({m.in_channels}, {m.out_channels}, {k}{stride})"
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}, {m.out_features})"
    if isinstance(m, nn.Dropout):
        return f"Dropout({m.p})"
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return f"{type(m).__name__}({m.kernel_size})"
    return type(m).__name__


def layer_table(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerRow]:
    """One row per leaf module that runs on an input of ``input_shape`` (C, H, W), in the
    order they run; a module called twice gets two rows."""
    rows: list[LayerRow] = []
    names = {m: n for n, m in model.named_modules()}

    def record(module, _inputs, output):
        shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(LayerRow(names[module], _kind(module), shape, params))

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows
