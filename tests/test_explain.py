import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.data.augment import center_crop
from cnnkit.data.memory import Normalizer
from cnnkit.evaluate.explain import GradCAM, explain_images, last_conv_layer, overlay
from cnnkit.models import create_model


def test_grad_cam_finds_the_region_that_carries_the_class():
    """Class 1 images have a bright square somewhere on noise, class 0 images do not; the
    heatmap for class 1 must peak on the square."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        x = torch.rand(n, 1, 32, 32, generator=g) * 0.5
        y = torch.randint(0, 2, (n,), generator=g)
        pos = torch.randint(0, 24, (n, 2), generator=g)
        for i in torch.nonzero(y).flatten().tolist():
            r, c = pos[i].tolist()
            x[i, 0, r : r + 8, c : c + 8] = 1.0
        return x, y, pos

    model = create_model("conv8same-conv16same-pool-conv16same-gap", 2, 1, (32, 32))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        x, y, _ = batch(64)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y, pos = batch(64)
    x, pos = x[y == 1][:16], pos[y == 1][:16]
    cam, logits = GradCAM(model)(x, torch.ones(len(x), dtype=torch.long))
    assert (logits.argmax(1) == 1).float().mean() > 0.9  # the model learned the task
    hits = 0
    for heat, (r, c) in zip(cam, pos.tolist(), strict=True):
        pr, pc = divmod(int(heat.argmax()), 32)
        hits += (r - 2 <= pr < r + 10) and (c - 2 <= pc < c + 10)
    assert hits >= 14, hits  # the peak lies on (or at the edge of) the square


def test_layer_choice():
    model = create_model("resnet20", 10, 3)
    assert last_conv_layer(model) == "blocks.8.conv2"
    with pytest.raises(ValueError, match="no layer 'nope'.*blocks.8.conv2"):
        GradCAM(model, "nope")


def pixels(images) -> list[bytes]:
    return [im.tobytes() for im in images]


def test_explain_images_matches_the_inline_grad_cam_and_overlay():
    """The same overlays and logits as GradCAM + overlay written out, for the predicted
    class by default and for given targets."""
    torch.manual_seed(0)
    model = create_model("conv8same-conv16same-pool-conv16same-gap", 3, 1, (16, 16)).eval()
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    normalizer = Normalizer([0.5], [0.25], torch.device("cpu"))

    heat, logits = GradCAM(model)(normalizer(x))
    images, got_logits = explain_images(model, normalizer, x)
    assert pixels(images) == pixels(overlay(x[i], heat[i]) for i in range(len(x)))
    torch.testing.assert_close(got_logits, logits)
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in images)

    targets = torch.tensor([2, 0, 1, 2])
    heat, _ = GradCAM(model, "features.0")(normalizer(x), targets)
    images, _ = explain_images(model, normalizer, x, targets, layer="features.0")
    assert pixels(images) == pixels(overlay(x[i], heat[i]) for i in range(len(x)))


def test_explain_images_draws_on_the_centre_crop_of_images_stored_larger():
    """Images stored at 20x24 for a 16x16 model: the overlay is drawn over the centre crop
    the model saw, exactly as for images cropped beforehand."""
    torch.manual_seed(0)
    model = create_model("conv8same-conv16same-pool-conv16same-gap", 2, 3, (16, 16)).eval()
    stored = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    normalizer = Normalizer([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], torch.device("cpu"), crop=(16, 16))
    cropped = center_crop(stored, (16, 16))

    images, logits = explain_images(model, normalizer, stored)
    heat, expected_logits = GradCAM(model)(normalizer(stored))
    assert all(im.size == (16, 16) for im in images)
    assert pixels(images) == pixels(overlay(cropped[i], heat[i]) for i in range(len(stored)))
    torch.testing.assert_close(logits, expected_logits)
    same, same_logits = explain_images(model, normalizer, cropped.contiguous())
    assert pixels(images) == pixels(same)
    torch.testing.assert_close(logits, same_logits)


def test_explain_command_and_api(tiny_run, tmp_path, capsys):
    from cnnkit.data import load_dataset

    digit = load_dataset("mnist", val_split=0).test.images[0, 0].numpy()
    path = tmp_path / "seven.png"
    Image.fromarray(digit).save(path)
    assert main(["explain", str(tiny_run.path), str(path), "--out", str(tmp_path / "o")]) == 0
    out = tmp_path / "o" / "seven-gradcam.png"
    # saved at a size an image viewer shows: each of the 28x28 pixels an 8x8 square
    assert out.is_file() and Image.open(out).size == (224, 224)
    assert "seven.png: " in capsys.readouterr().out
    pred, image = tiny_run.explain(path, layer="features.0")[0]
    assert pred.label is not None and image.size == (28, 28)
    _, default_layer = tiny_run.explain(path)[0]
    enlarged = np.asarray(default_layer).repeat(8, 0).repeat(8, 1)
    assert (np.asarray(Image.open(out)) == enlarged).all()


def test_viewable_enlarges_small_images_by_a_whole_factor_and_keeps_large_ones():
    from cnnkit.evaluate.explain import viewable

    small = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    big = viewable(small)
    assert big.size == (224, 224)
    assert (np.asarray(big) == np.asarray(small).repeat(8, 0).repeat(8, 1)).all()  # crisp
    assert viewable(Image.new("RGB", (100, 60))).size == (400, 240)  # 60 * 4 >= 224
    large = Image.new("RGB", (300, 224))
    assert viewable(large) is large


def test_tta_averages_the_views(tiny_run):
    from cnnkit.data import load_dataset

    images = load_dataset("mnist", val_split=0).test.images[:16]
    tta = tiny_run.tta_logits(images).exp()
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    views = [images] + [
        padded[..., dy : dy + 28, dx : dx + 28] for dy, dx in ((0, 2), (4, 2), (2, 0), (2, 4))
    ]  # no flips: digits
    expected = sum(tiny_run.logits(v).softmax(1) for v in views) / 5
    torch.testing.assert_close(tta, expected)


def test_compare_runs(mnist_dir, tmp_path, capsys):
    import cnnkit

    kw = dict(epochs=1, limit=500, runs_dir=str(tmp_path), quiet=True)
    a = cnnkit.train(name="lr-small", lr=1e-4, **kw).path
    b = cnnkit.train(name="lr-big", lr=3e-3, **kw).path
    assert main(["compare", str(a), str(b), "--json", "--out", str(tmp_path / "c.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["differences"] == {"optim.lr": [1e-4, 3e-3]}
    vals = [r["val_accuracy"] for r in result["runs"]]  # never the test split
    assert result["best"] == result["runs"][vals.index(max(vals))]["run"]
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    assert "optim.lr" in capsys.readouterr().out


def test_explain_gives_two_files_with_one_name_two_outputs(tiny_run, tmp_path, capsys):
    from cnnkit.data import load_dataset

    digits = load_dataset("mnist", val_split=0).test.images[:2, 0].numpy()
    for folder, digit in zip(("a", "b"), digits, strict=True):
        (tmp_path / folder).mkdir()
        Image.fromarray(digit).save(tmp_path / folder / "1.png")
    files = [str(tmp_path / "a" / "1.png"), str(tmp_path / "b" / "1.png")]
    assert main(["explain", str(tiny_run.path), *files, "--out", str(tmp_path / "o")]) == 0
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert written == ["1-2-gradcam.png", "1-gradcam.png"]  # neither overwrote the other


def test_layer_table_follows_the_model(capsys):
    from cnnkit.models.summary import layer_table

    model = create_model("seed-cnn", 10, 1, (28, 28))
    rows = layer_table(model, (1, 28, 28))
    assert (rows[0].name, rows[0].output, rows[0].params) == ("features.0", (32, 26, 26), 320)
    assert rows[-1].output == (10,) and rows[-1].kind == "Linear(64, 10)"
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    assert main(["models", "seed-cnn", "--input", "3x32x32"]) == 0
    assert "64x6x6" in capsys.readouterr().out  # (32 - 2) / 2 = 15, (15 - 2) / 2 = 6
    assert main(["models", "seed-cnn", "--input", "28x28"]) == 1
    assert "--input takes CxHxW" in capsys.readouterr().err


def test_feature_maps_are_the_first_convolutions_output(tiny_run, tmp_path, capsys):
    from cnnkit.data import load_dataset

    digit = load_dataset("mnist", val_split=0).test.images[0]
    file = tmp_path / "digit.png"
    Image.fromarray(digit[0].numpy()).save(file)
    maps, layer = tiny_run.feature_maps(str(file))
    assert layer == "features.0" and maps.shape == (32, 26, 26)
    model = tiny_run.model.eval()
    with torch.no_grad():
        expected = model.features[0](tiny_run.normalizer(digit[None].to(tiny_run.device)))
    torch.testing.assert_close(maps, expected[0].float().cpu())
    assert main(["explain", str(tiny_run.path), str(file), "--feature-maps"]) == 0
    grid = Image.open(tiny_run.path / "explain" / "digit-features.png")
    assert grid.size == (8 * 66 - 2, 4 * 66 - 2)  # 32 maps, 8 a row, 64 px and a 2 px gap
    assert "features.0, 32 maps of 26x26" in capsys.readouterr().out


def test_augmentation_grid_shows_originals_then_views():
    from cnnkit.data import load_dataset
    from cnnkit.data.augment import augment_grid

    data = load_dataset("mnist", val_split=0, limit=500)
    grid, rows = augment_grid(data, "affine", views=3)
    assert rows == 10 and grid.size == ((4 * 30 - 2) * 3, (10 * 30 - 2) * 3)
    pixels = np.asarray(grid)[::3, ::3]  # back to one pixel per digit pixel
    first = data.train.images[int((data.train.labels == 0).nonzero()[0])][0].numpy()
    assert (pixels[:28, :28] == first).all()  # the original first
    assert not (pixels[:28, 30:58] == first).all()  # then a moved copy
    plain, _ = augment_grid(data, "none", views=3)
    still = np.asarray(plain)[::3, ::3]
    assert (still[:28, 30:58] == first).all()  # 'none' leaves it as it is
