"""Grad-CAM (Selvaraju et al. 2017): where in the image the evidence for a class lies.

The activations A of a convolutional layer (the last one, unless told otherwise) are
weighted by the spatial mean of the class score's gradient with respect to them; the ReLU
of that weighted sum, upsampled to the image, is the heatmap.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.data.augment import center_crop

if TYPE_CHECKING:
    from PIL import Image

    from cnnkit.data.memory import Normalizer


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the model's convolutional layers, in order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def last_conv_layer(model: nn.Module) -> str:
    """The last convolution with a spatial kernel: its maps are the most class-specific
    that still keep the image's layout (a 1x1 projection after it would do too, but the
    last spatial one is what most Grad-CAM implementations pick)."""
    names = conv_layers(model)
    if not names:
        raise ValueError("the model has no convolutional layer for Grad-CAM")
    modules = dict(model.named_modules())
    spatial = [n for n in names if modules[n].kernel_size != (1, 1)]
    return (spatial or names)[-1]


class GradCAM:
    """Heatmaps for a batch: ``GradCAM(model)(x, classes)`` -> (N, H, W) in [0, 1]."""

    def __init__(self, model: nn.Module, layer: str | None = None):
        self.model = model
        modules = dict(model.named_modules())
        self.layer = layer or last_conv_layer(model)
        if self.layer not in modules:
            raise ValueError(
                f"no layer '{self.layer}' in the model; convolutional layers: "
                + ", ".join(conv_layers(model)[-8:])
            )
        self.module = modules[self.layer]

    def __call__(self, x: torch.Tensor, classes: torch.Tensor | None = None):
        """Heatmaps (N, H, W) and the logits. ``classes``: whose evidence (default: the
        predicted class of each image)."""
        saved: dict[str, torch.Tensor] = {}

        def keep(module, inputs, output):
            output.retain_grad()
            saved["maps"] = output

        handle = self.module.register_forward_hook(keep)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)  # gradients flow even into frozen layers
                logits = self.model(x)
                if classes is None:
                    classes = logits.argmax(1)
                score = logits.gather(1, classes.view(-1, 1)).sum()
                self.model.zero_grad(set_to_none=True)
                score.backward()
        finally:
            handle.remove()
            self.model.train(was_training)
        maps, grads = saved["maps"].detach(), saved["maps"].grad.detach()
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * maps).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        top = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
        return (cam / top).float(), logits.detach()


def _jet(v: np.ndarray) -> np.ndarray:
    """A jet-like colour map: 0 blue, 0.5 green-yellow, 1 red. (H, W) -> (H, W, 3) uint8."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image: torch.Tensor, cam: torch.Tensor, alpha: float = 0.45):
    """A PIL image: the uint8 (C, H, W) image with the heatmap blended over it."""
    from PIL import Image

    img = image.detach().cpu()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    base = img.permute(1, 2, 0).numpy().astype(np.float32)
    heat = _jet(cam.detach().cpu().numpy()).astype(np.float32)
    return Image.fromarray((base * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8))


# Saved overlays are enlarged until their shorter side is at least this (a 28x28 MNIST
# heatmap is a thumbnail too small to read in an image viewer).
VIEWABLE_SIDE = 224


def viewable(image: Image.Image, min_side: int = VIEWABLE_SIDE) -> Image.Image:
    """``image`` enlarged by the smallest whole factor that makes its shorter side at least
    ``min_side`` (28x28 -> 224x224); larger images are returned as they are.

    Nearest-neighbour: every pixel the model saw stays a crisp square, nothing is smoothed
    in that the model did not see.
    """
    from PIL import Image

    factor = math.ceil(min_side / max(min(image.size), 1))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def feature_maps(model: nn.Module, x: torch.Tensor, layer: str | None = None):
    """The output maps (K, h, w) of one layer (default: the first convolution) for one
    normalised image ``x`` (1, C, H, W), and the layer's name: what that layer sees."""
    modules = dict(model.named_modules())
    names = conv_layers(model)
    layer = layer or (names[0] if names else None)
    if layer not in modules:
        raise ValueError(
            f"no layer '{layer}' in the model; convolutional layers: {', '.join(names[:8])}"
        )
    saved: dict[str, torch.Tensor] = {}
    handle = modules[layer].register_forward_hook(lambda m, i, out: saved.update(maps=out))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    maps = saved["maps"]
    if maps.dim() != 4:
        raise ValueError(f"layer '{layer}' gives no image-like maps (shape {tuple(maps.shape)})")
    return maps[0].float().cpu(), layer


def feature_grid(maps: torch.Tensor, columns: int = 8, cell: int = 64) -> Image.Image:
    """A PIL image of (K, h, w) maps in a grid, each scaled to its own 0-255 range
    (bright: a strong response) and enlarged to ``cell`` pixels with a 2-pixel gap."""
    from PIL import Image

    k = maps.shape[0]
    rows = math.ceil(k / columns)
    gap = 2
    grid = Image.new("L", (columns * (cell + gap) - gap, rows * (cell + gap) - gap), 40)
    for i, m in enumerate(maps):
        lo, hi = float(m.min()), float(m.max())
        scaled = ((m - lo) / (hi - lo) * 255 if hi > lo else torch.zeros_like(m)).byte()
        tile = Image.fromarray(scaled.numpy()).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, ((i % columns) * (cell + gap), (i // columns) * (cell + gap)))
    return grid


def explain_images(
    model: nn.Module,
    normalizer: Normalizer,
    images: torch.Tensor,
    targets: torch.Tensor | None = None,
    layer: str | None = None,
) -> tuple[list[Image.Image], torch.Tensor]:
    """Grad-CAM overlays (one PIL image each) and the logits for a uint8 batch (N, C, H, W).

    ``images`` are on the model's device, at the model's input size or stored larger (the
    normalizer then centre-crops them). ``targets``: the class whose evidence to show for
    each image (default: the predicted class). ``layer``: as for GradCAM.
    """
    x = normalizer(images)
    if targets is not None:
        targets = targets.to(x.device)
    heat, logits = GradCAM(model, layer)(x, targets)
    # draw over the pixels the model saw, not the border the crop dropped
    size = tuple(x.shape[-2:])
    shown = images if tuple(images.shape[-2:]) == size else center_crop(images, size)
    return [overlay(image, cam) for image, cam in zip(shown, heat, strict=True)], logits
