"""Turning an image from anywhere (file, PIL, array, tensor) into a model's uint8 input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """An image that cannot be read or converted; the message names the file and why.

    ``reason`` is the decoder's own words, where there are any.
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class ImageNotFoundError(ImageReadError):
    """No file at the path, or a directory there."""


class NotAnImageError(ImageReadError):
    """Not an image, or a format Pillow cannot read."""


class EmptyImageError(NotAnImageError):
    """No bytes at all (callers may answer it apart from other non-images)."""


class ImageTooLargeError(ImageReadError):
    """More pixels than allowed, found from the header before the pixels are decoded.

    ``size`` and ``max_pixels`` are set when ``max_pixels`` refused it; both are None when
    Pillow's own decompression-bomb limit did.
    """

    def __init__(
        self,
        message: str,
        reason: str = "",
        size: tuple[int, int] | None = None,
        max_pixels: int | None = None,
    ):
        super().__init__(message, reason)
        self.size, self.max_pixels = size, max_pixels


class CorruptImageError(ImageReadError):
    """A recognised format whose data does not decode: truncated or corrupt."""


def open_image(
    source: str | Path | bytes, draft: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Open and fully decode an image file or in-memory bytes, applying its EXIF orientation.

    The first frame of an animation is taken. ``draft``: the smallest side needed; JPEGs much
    larger than that are decoded at a reduced scale by libjpeg itself (several times faster,
    same result after resizing). ``max_pixels``: refuse larger images from their header,
    before any pixel is decoded. Every failure is an ``ImageReadError`` subclass naming the
    source (a path, or "image data").
    """
    if isinstance(source, bytes):
        name, fp = "image data", io.BytesIO(source)
    else:
        source = Path(source)
        name, fp = str(source), source
    try:
        with Image.open(fp) as im:  # reads the header only
            _check_pixels(im, max_pixels, name)
            im.seek(0)  # first frame of animations
            if draft and im.format == "JPEG" and im.mode in ("RGB", "L"):
                im.draft(im.mode, (draft, draft))
            im.load()
            return ImageOps.exif_transpose(im)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageNotFoundError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageNotFoundError(f"{name}: is a directory, not an image") from None
    except UnidentifiedImageError:
        kind = EmptyImageError if _is_empty(source) else NotAnImageError
        raise kind(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: too large to decode ({e})", str(e)) from None
    # Image.open itself raises OSError or ValueError on some truncated headers.
    except (OSError, SyntaxError, ValueError, NotImplementedError) as e:
        raise CorruptImageError(
            f"{name}: cannot decode image ({e}); is it truncated?", str(e)
        ) from None


def _check_pixels(im: Image.Image, max_pixels: int | None, name: str) -> None:
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}",
            size=(w, h),
            max_pixels=max_pixels,
        )


def _is_empty(source: Path | bytes) -> bool:
    if isinstance(source, bytes):
        return not source
    try:
        return source.stat().st_size == 0
    except OSError:
        return False


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


GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}


def image_header(path: Path) -> tuple[str, int, int] | None:
    """(mode, width, height) from a file's header, without decoding the pixels; None when
    it is not an image Pillow reads. Rotation by EXIF is not applied (the shorter side,
    which is what callers need, is the same)."""
    try:
        with Image.open(path) as im:
            return im.mode, *im.size
    except Exception:  # any file that is no readable image: the decoder reports it later
        return None


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
