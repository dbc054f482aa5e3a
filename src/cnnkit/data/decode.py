"""Turning an image from anywhere (file, PIL, array, tensor) into a model's uint8 input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """An image that cannot be read or converted; the message names the file and why."""


def open_image(path: str | Path, draft: int | None = None) -> Image.Image:
    """Open and fully decode an image file, applying its EXIF orientation.

    ``draft``: the smallest side needed; JPEGs much larger than that are decoded at a
    reduced scale by libjpeg itself (several times faster, same result after resizing).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.seek(0)  # first frame of animations
            if draft and im.format == "JPEG" and im.mode in ("RGB", "L"):
                im.draft(im.mode, (draft, draft))
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


def resize_and_crop(im: Image.Image, channels: int, size: int) -> Image.Image:
    """Convert the mode, resize the shorter side to ``size`` and crop the centre square."""
    im = to_mode(im, channels)
    w, h = im.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    im = im.resize(new, Image.BICUBIC, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def stored_size(preprocessing: dict) -> int:
    """The side photos are decoded at: the input size over the crop share (224 / 0.875)."""
    return round(preprocessing["size"][0] / preprocessing.get("crop_pct", 1.0))


def to_input_tensor(image, preprocessing: dict) -> torch.Tensor:
    """uint8 (C, H, W) prepared as the checkpoint's preprocessing says.

    'stretch' (the built-in data sets): resize to the input size. 'shorter-side' (photos):
    resize the shorter side to size / crop_pct, then take the centre crop.
    """
    channels = preprocessing["channels"]
    height, width = preprocessing["size"]
    im = to_pil(image)
    if preprocessing.get("resize") == "shorter-side":
        im = resize_and_crop(im, channels, stored_size(preprocessing))
        left, top = (im.size[0] - width) // 2, (im.size[1] - height) // 2
        im = im.crop((left, top, left + width, top + height))
    else:
        im = to_mode(im, channels)
        if im.size != (width, height):
            im = im.resize((width, height), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a.copy())
