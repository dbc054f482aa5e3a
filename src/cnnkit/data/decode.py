"""Turning an image from anywhere (file, PIL, array, tensor) into a model's uint8 input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """An image that cannot be read or converted; the message names the file and why."""


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, applying its EXIF orientation."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.seek(0)  # first frame of animations
            im.load()
            return ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{path}: not an image file (or a format Pillow cannot read)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot decode image ({e}); is it truncated?") from None


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to 'L' (1 channel) or 'RGB' (3 channels)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if a.max() <= 1 else 255.0
        im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):  # composite transparency on white
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im.convert("L" if channels == 1 else "RGB")


def to_pil(image) -> Image.Image:
    """A PIL image from a path, PIL image, numpy array (HW/HWC) or tensor (HW/CHW).

    Arrays and tensors hold 0-255 (uint8) or 0-1 (float) values.
    """
    if isinstance(image, (str, Path)):
        return open_image(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)  # CHW -> HWC
        image = t.numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.dtype != np.uint8:
            scale = 255.0 if float(a.max(initial=0)) <= 1.0 else 1.0
            a = np.clip(a.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
            raise ImageReadError(f"array of shape {image.shape} is not an HW, HWC or CHW image")
        return Image.fromarray(a)
    raise ImageReadError(f"cannot read an image from a {type(image).__name__}")


def to_input_tensor(image, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) at the model's channels and size (bilinear, antialiased)."""
    im = to_mode(to_pil(image), channels)
    height, width = size
    if im.size != (width, height):
        im = im.resize((width, height), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a.copy())
