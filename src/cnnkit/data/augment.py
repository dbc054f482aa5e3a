"""Augmentation presets as whole-batch tensor operations on the training device.

Each preset takes a float batch in [0, 1] (N, C, H, W) and a torch.Generator on the same
device, and draws one set of random parameters per image in a single call: no per-sample
Python. Out-of-image pixels are filled with 0 (black), which is the background of MNIST
and the padding the CIFAR recipes use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def random_affine(
    x: torch.Tensor,
    g: torch.Generator,
    degrees: float = 10.0,
    zoom: float = 0.1,
    shift: float = 0.1,
) -> torch.Tensor:
    """Rotate by up to +-degrees, zoom by 1 +- zoom, shift by up to +-shift of the size.

    The Keras tutorial's ImageDataGenerator(rotation_range=10, zoom_range=0.1,
    width_shift_range=0.1, height_shift_range=0.1), as one affine_grid + grid_sample.
    """
    n, dev = x.shape[0], x.device
    angle = _uniform(n, -degrees, degrees, g, dev) * (math.pi / 180)
    scale = _uniform(n, 1 - zoom, 1 + zoom, g, dev)
    # affine_grid's coordinates span [-1, 1], so a shift of f of the width is 2f.
    tx = _uniform(n, -2 * shift, 2 * shift, g, dev)
    ty = _uniform(n, -2 * shift, 2 * shift, g, dev)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_crop(x: torch.Tensor, g: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=g, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=g, device=x.device)
    rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, x.shape[1], h, w)
    cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    # Two gathers: pick the rows of each image, then the columns of those rows.
    picked = padded.gather(2, rows[..., :1].expand(n, x.shape[1], h, w + 2 * padding))
    return picked.gather(3, cols)


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror half of the images left-right."""
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def _crop_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return random_flip(random_crop(x, g), g)


def random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Move each image by up to 2 pixels each way (digits: no flips, no rotations)."""
    return random_crop(x, g, padding=2)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The central (h, w) window of every image."""
    h, w = size
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def random_resized_crop(
    x: torch.Tensor,
    g: torch.Generator,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """A random window (area ``scale`` of the image, aspect ``ratio``) resized to ``size``.

    The window is drawn per image and sampled with one affine_grid + grid_sample. The area
    range starts at 0.25 rather than ImageNet's 0.08: fine-tuning on a few hundred photos
    per class needs the object to stay in view.
    """
    n, dev = x.shape[0], x.device
    area = _uniform(n, *scale, g, dev)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g, dev)
    aspect = torch.exp(log_ratio)
    sx = torch.sqrt(area * aspect).clamp(max=1.0)  # window width as a share of the image
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    tx = (torch.rand(n, generator=g, device=dev) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=g, device=dev) * 2 - 1) * (1 - sy)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """Random brightness, contrast and (colour images) saturation, each within +-strength."""
    n, dev = x.shape[0], x.device
    b = _uniform(n, 1 - strength, 1 + strength, g, dev).view(-1, 1, 1, 1)
    c = _uniform(n, 1 - strength, 1 + strength, g, dev).view(-1, 1, 1, 1)
    x = x * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    if x.shape[1] == 3:
        s = _uniform(n, 1 - strength, 1 + strength, g, dev).view(-1, 1, 1, 1)
        grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x)
        x = (x - grey) * s + grey
    return x.clamp_(0, 1)


def photo(x: torch.Tensor, g: torch.Generator, size: tuple[int, int]) -> torch.Tensor:
    """Photos: random resized crop, horizontal flip, small colour jitter."""
    return color_jitter(random_flip(random_resized_crop(x, g, size), g), g)


PRESETS: dict[str, tuple[Augment | None, str]] = {
    "none": (None, "no augmentation"),
    "affine": (random_affine, "rotation 10 deg, zoom 0.1, shift 0.1 (the Keras tutorial's)"),
    "shift": (random_shift, "random shift by up to 2 px, zero fill (digits, small images)"),
    "crop-flip": (_crop_flip, "random crop with 4 px padding + horizontal flip (CIFAR)"),
    "flip": (random_flip, "horizontal flip"),
    "photo": (photo, "random resized crop, flip, colour jitter (photos)"),
}


def get_augment(name: str) -> Augment | None:
    """The augmentation function of a preset name (None for 'none')."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown augmentation '{name}'; choose one of: "
            + ", ".join(f"{k} ({v[1]})" for k, v in PRESETS.items())
        )
    return PRESETS[name][0]


def train_transform(name: str, stored: tuple[int, int], size: tuple[int, int]) -> Augment | None:
    """What a training batch goes through: the preset, ending at the model's input size.

    Images may be stored larger than the model input (photos are kept at size / crop_pct):
    'photo' crops at random; the other presets work at the stored size and are followed by
    the same centre crop evaluation uses.
    """
    fn = get_augment(name)
    if name == "photo":
        return lambda x, g: photo(x, g, size)
    if tuple(stored) == tuple(size):
        return fn
    if fn is None:
        return lambda x, g: center_crop(x, size)
    return lambda x, g: center_crop(fn(x, g), size)


def augment_grid(data, preset: str, views: int = 7, rows: int = 10, seed: int = 0):
    """A PIL image: per row, one training image of a class (up to ``rows`` classes), then
    ``views`` augmented versions drawn as training draws them (seeded); and the row count."""
    from PIL import Image

    train = data.train
    labels = train.labels if train.labels.dim() == 1 else train.labels.argmax(1)
    picks = [int(torch.nonzero(labels == c)[0]) for c in labels.unique().tolist()[:rows]]
    originals = train.images[picks]
    size = tuple(data.shape[1:])
    fn = train_transform(preset, tuple(originals.shape[-2:]), size)
    g = torch.Generator().manual_seed(seed)
    unit = originals.float() / 255  # augmentation works on [0, 1] floats, as in training
    shown = [center_crop(unit, size)]
    shown += [fn(unit, g) if fn else center_crop(unit, size) for _ in range(views)]
    tiles = (torch.stack(shown, 1) * 255).round().clamp(0, 255).byte()  # (rows, 1+views, C, H, W)
    n, cols, c, h, w = tiles.shape
    gap = max(1, h // 14)
    canvas = torch.full((c, n * (h + gap) - gap, cols * (w + gap) - gap), 255, dtype=torch.uint8)
    for i in range(n):
        for j in range(cols):
            canvas[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = tiles[
                i, j
            ]
    array = canvas.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    factor = max(1, 96 // h)  # 28x28 digits drawn at 3x
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST), n
