import pytest
import torch

from cnnkit.data.augment import get_augment, random_affine, random_crop, random_flip


def batch(n=8, c=1, h=28, w=28):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0))


def test_affine_without_movement_is_identity():
    x = batch()
    y = random_affine(x, torch.Generator().manual_seed(1), degrees=0, zoom=0, shift=0)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_affine_moves_each_image_differently_and_is_seeded():
    x = batch()
    y1 = random_affine(x, torch.Generator().manual_seed(1))
    y2 = random_affine(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(y1, y2)
    assert y1.shape == x.shape
    diffs = (y1 - x).abs().flatten(1).mean(1)
    assert (diffs > 1e-3).all() and diffs.unique().numel() == len(x)


def test_affine_shift_moves_content_by_at_most_the_shift():
    x = torch.zeros(64, 1, 20, 20)
    x[:, :, 10, 10] = 1.0  # one bright pixel in the middle
    y = random_affine(x, torch.Generator().manual_seed(0), degrees=0, zoom=0, shift=0.1)
    rows = y[:, 0].sum(2).argmax(1) - 10
    cols = y[:, 0].sum(1).argmax(1) - 10
    assert rows.abs().max() <= 2 and cols.abs().max() <= 2  # 0.1 of 20 px
    assert (rows != 0).any() and (cols != 0).any()


def test_crop_is_a_shift_with_zero_fill():
    x = batch(n=16, c=3, h=8, w=8) + 1  # strictly positive, so fill shows as 0
    y = random_crop(x, torch.Generator().manual_seed(0), padding=2)
    for xi, yi in zip(x, y, strict=True):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(xi)
                src = xi[:, max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)]
                shifted[:, max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)] = src
                found |= torch.equal(shifted, yi)
        assert found


def test_flip_mirrors_some_images_exactly():
    x = batch(n=32)
    y = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(yi, xi.flip(2)) for xi, yi in zip(x, y, strict=True)]
    kept = [torch.equal(yi, xi) for xi, yi in zip(x, y, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'.*affine.*crop-flip"):
        get_augment("rotate")


def test_shift_preset_moves_digits_up_to_two_pixels_without_mirroring():
    x = torch.zeros(256, 1, 28, 28)
    x[:, :, 14, 10] = 1.0  # off-centre, so a mirror image would land at column 17
    y = get_augment("shift")(x, torch.Generator().manual_seed(0))
    assert torch.equal(y.flatten(1).sum(1), x.flatten(1).sum(1))  # nothing cut off
    rows = y[:, 0].sum(2).argmax(1) - 14
    cols = y[:, 0].sum(1).argmax(1) - 10
    assert rows.abs().max() == 2 and cols.abs().max() == 2
    assert set(cols.tolist()) == set(range(-2, 3))
