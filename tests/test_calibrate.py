"""Temperature scaling (runs/calibrate.py): T recovered on known logits, folded into
best.pt so that evaluation and exports give calibrated probabilities, predictions kept."""

import numpy as np
import pytest
import torch

import cnnkit
from cnnkit.evaluate.metrics import calibration
from cnnkit.runs.calibrate import final_linear, fit_temperature


def test_a_known_temperature_is_recovered():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 5, generator=g) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)  # calibrated
    assert fit_temperature(logits * 3, labels) == pytest.approx(3, rel=0.05)
    assert fit_temperature(logits / 2, labels) == pytest.approx(0.5, rel=0.05)


def test_the_classifier_layer_is_the_last_linear_with_one_output_per_class():
    model = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10))
    name, layer = final_linear(model, 10)
    assert name == "2" and layer is model[2]
    assert final_linear(torch.nn.Sequential(torch.nn.Linear(8, 4)), 10) is None


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same MNIST run trained twice: calibrated (the default) and --calibrate none."""
    from cnnkit.data import BUILTINS, is_available

    if is_available(BUILTINS["mnist"]) is None:
        pytest.skip("MNIST not available")
    runs = tmp_path_factory.mktemp("runs")
    # fp32: the comparisons below are to 1e-3, finer than bf16 autocast rounds logits
    common = dict(
        data="mnist", limit=2000, epochs=2, runs_dir=str(runs), quiet=True, precision="fp32"
    )
    return cnnkit.train(name="cal", **common), cnnkit.train(name="raw", calibrate="none", **common)


def test_best_pt_holds_the_temperature_folded_into_its_logits(pair):
    cal, raw = pair
    record = cal.calibration
    assert raw.calibration is None and record["fitted_on"] == "val"
    assert record["ece_after"] < record["ece_before"]
    assert record["nll_after"] <= record["nll_before"]
    test = cal.data().test
    images = test.images[:500]
    scaled, plain = cal.logits(images), raw.logits(images)
    assert torch.allclose(scaled, plain / record["temperature"], atol=1e-3, rtol=1e-3)
    assert torch.equal(scaled.argmax(1), plain.argmax(1))  # no prediction changes


def test_calibration_lowers_the_error_on_the_unseen_test_split(pair):
    cal, raw = pair
    test = cal.data().test
    labels = test.labels
    after = calibration(cal.probabilities(test.images).cpu(), labels)["ece"]
    before = calibration(raw.probabilities(test.images).cpu(), labels)["ece"]
    assert after < before
    assert cal.evaluate(split="test", save=False).accuracy == pytest.approx(
        raw.evaluate(split="test", save=False).accuracy
    )


def test_exports_give_the_calibrated_probabilities(pair, tmp_path):
    pytest.importorskip("onnxruntime")
    from cnnkit.deploy.export import export_onnx
    from cnnkit.deploy.onnx_model import OnnxModel

    cal, raw = pair
    export_onnx(cal, tmp_path / "m.onnx")
    images = cal.data().test.images[:64]
    onnx = OnnxModel(tmp_path / "m.onnx").probabilities(images)
    expected = (raw.logits(images) / cal.calibration["temperature"]).softmax(1).cpu().numpy()
    assert np.allclose(onnx, expected, atol=1e-4)


def test_a_pretrained_photo_model_is_never_made_worse(cats_run):
    """Lite0 on 160 photos: T is fitted on the validation photos and folded in only when
    it lowers their ECE as well as their NLL; else the weights stay as trained."""
    record = cats_run.calibration
    assert record is not None and record["ece_after"] <= record["ece_before"]
    if "ece_if_applied" in record:  # not folded in
        assert record["temperature"] == 1.0 and record["ece_if_applied"] > record["ece_before"]
