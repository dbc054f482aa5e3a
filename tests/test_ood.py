"""Out-of-distribution scores (evaluate/ood.py, runs/ood.py): the measures on known
scores, the conversion of other images to the run's input, and real separations."""

import json

import pytest
import torch

from cnnkit.cli import main
from cnnkit.evaluate.ood import auroc, ood_report, threshold_for
from cnnkit.runs.ood import as_run_input


def test_auroc_on_known_orderings():
    inside, outside = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0, 2.0])
    assert auroc(inside, outside) == 1.0
    assert auroc(outside, inside) == 0.0
    assert auroc(torch.ones(4), torch.ones(6)) == 0.5  # all tied
    # 2 of the 4 pairs ordered, 1 tied: (2 + 0.5) / 4
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.625)


def test_the_threshold_keeps_the_stated_share_of_known_images():
    inside = torch.arange(1000, dtype=torch.float64)
    t = threshold_for(inside, 0.95)
    assert (inside >= t).double().mean() == pytest.approx(0.95, abs=0.002)
    logits_in = torch.tensor([[9.0, 0.0]] * 50)
    logits_out = torch.tensor([[0.1, 0.0]] * 50)
    report = ood_report(logits_in, logits_out)
    assert report["energy"]["auroc"] == 1.0 and report["energy"]["out_rejected"] == 1.0


def test_other_images_become_the_runs_input():
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    photo_run = {"channels": 3, "size": [64, 64], "resize": "shorter-side", "crop_pct": 0.875}
    x = as_run_input(grey, photo_run)
    assert x.shape == (2, 3, 73, 73) and x.dtype == torch.uint8  # 64 / 0.875, cropped later
    assert torch.equal(x[:, 0], x[:, 2])
    rgb = torch.zeros(1, 3, 28, 28, dtype=torch.uint8)
    rgb[:, 1] = 200  # pure green: Pillow's luma 0.587 * 200
    digit_run = {"channels": 1, "size": [28, 28], "resize": "stretch"}
    assert int(as_run_input(rgb, digit_run)[0, 0, 0, 0]) == round(0.587 * 200)


def test_mnist_against_fashion_mnist(tiny_run, fashion_dir, capsys):
    """The 1-epoch tutorial CNN: digits against clothes, 1,000 of each kind."""
    args = ["evaluate", str(tiny_run.path), "--ood", "fashion-mnist", "--ood-limit", "1000"]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["out_of_distribution"]["images"] == 1000
    energy = result["scores"]["energy"]
    assert energy["auroc"] > 0.85  # measured 0.96 after 3 epochs (docs/trust.md)
    assert energy["in_accepted"] == pytest.approx(0.95, abs=0.01)
    stored = result["stored_rule"]  # the run's own threshold, fitted on validation
    assert stored["threshold"] == tiny_run.rejection["threshold"]
    assert stored["in_rejected"] == pytest.approx(0.05, abs=0.02)
    assert stored["out_rejected"] > 0.25
    assert (tiny_run.path / "eval-ood-fashion-mnist.json").is_file()


def test_a_photo_model_against_digits(cats_run, mnist_dir, capsys):
    """Lite0 fine-tuned on cats and dogs: MNIST digits, made into RGB photos, are told apart."""
    args = ["evaluate", str(cats_run.path), "--ood", "mnist", "--ood-limit", "300", "--json"]
    assert main(args) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert max(s["auroc"] for s in scores.values()) > 0.8
