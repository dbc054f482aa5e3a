import json

import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.evaluate.explain import GradCAM, last_conv_layer
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


def test_explain_command_and_api(tiny_run, tmp_path, capsys):
    from cnnkit.data import load_dataset

    digit = load_dataset("mnist", val_split=0).test.images[0, 0].numpy()
    path = tmp_path / "seven.png"
    Image.fromarray(digit).save(path)
    assert main(["explain", str(tiny_run.path), str(path), "--out", str(tmp_path / "o")]) == 0
    out = tmp_path / "o" / "seven-gradcam.png"
    assert out.is_file() and Image.open(out).size == (28, 28)
    assert "seven.png: " in capsys.readouterr().out
    pred, image = tiny_run.explain(path, layer="features.0")[0]
    assert pred.label is not None and image.size == (28, 28)


def test_tta_averages_the_views(tiny_run):
    from cnnkit.data import load_dataset

    images = load_dataset("mnist", val_split=0).test.images[:16]
    tta = tiny_run.tta_logits(images).exp()
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    views = [images] + [
        padded[..., dy : dy + 28, dx : dx + 28] for dy, dx in ((0, 2), (4, 2), (2, 0), (2, 4))
    ]  # no flips: digits
    expected = sum(tiny_run._logits(v).softmax(1) for v in views) / 5
    torch.testing.assert_close(tta, expected)


def test_compare_runs(mnist_dir, tmp_path, capsys):
    import cnnkit

    kw = dict(epochs=1, limit=500, runs_dir=str(tmp_path), quiet=True)
    a = cnnkit.train(name="lr-small", lr=1e-4, **kw).path
    b = cnnkit.train(name="lr-big", lr=3e-3, **kw).path
    assert main(["compare", str(a), str(b), "--json", "--out", str(tmp_path / "c.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["differences"] == {"optim.lr": [1e-4, 3e-3]}
    accs = [r["accuracy"] for r in result["runs"]]
    assert result["best"] == result["runs"][accs.index(max(accs))]["run"]
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    assert "optim.lr" in capsys.readouterr().out
