""" "Unknown": the threshold fitted on validation, and every way of predicting applying it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.data import load_dataset
from cnnkit.evaluate.ood import scores
from cnnkit.runs.reject import Rejection, fit_rejection


def test_the_rule_keeps_the_stated_share_of_validation_images():
    logits = torch.randn(1000, 5, generator=torch.Generator().manual_seed(0)) * 3
    record = fit_rejection(logits, acceptance=0.9)
    s = scores(logits)
    for name in ("energy", "max_softmax"):
        kept = (s[name] >= record["thresholds"][name]).double().mean()
        assert float(kept) == pytest.approx(0.9, abs=0.002)
    assert record["score"] == "energy" and record["threshold"] == record["thresholds"]["energy"]
    probs = logits.softmax(1).numpy()
    energy = torch.logsumexp(logits, 1).numpy()
    rule = Rejection.from_record(record, "max_softmax")
    assert np.allclose(rule.values(probs, energy), probs.max(1))
    assert np.allclose(Rejection.from_record(record).values(probs, energy), energy)
    with pytest.raises(ValueError, match="ood_score"):
        Rejection.from_record(record).values(probs, None)  # a file without the output


@pytest.fixture(scope="module")
def rule(tiny_run):
    return tiny_run.rejection


def test_training_stores_the_threshold_of_its_validation_split(tiny_run, rule):
    data = tiny_run.data()
    val = tiny_run.split_outputs(data, "val")
    energy = torch.logsumexp(val.logits.double(), 1)
    assert rule["fitted_on"] == "val" and rule["images"] == len(energy)
    assert rule["threshold"] == pytest.approx(float(torch.quantile(energy, 0.05)), rel=1e-6)
    assert rule["val_rejected"] == pytest.approx(0.05, abs=0.002)


def _fashion_and_digits(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    fashion = load_dataset("fashion-mnist", val_split=0).test.images[:n]
    digits = load_dataset("mnist", val_split=0).test.images[:n]
    return fashion, digits


def test_predict_answers_unknown_for_clothes_and_not_for_digits(tiny_run, fashion_dir):
    fashion, digits = _fashion_and_digits()
    clothes = tiny_run.predict(list(fashion))
    numbers = tiny_run.predict(list(digits))
    share = np.mean([p.unknown for p in clothes])
    assert share > 0.25 and share > 4 * np.mean([p.unknown for p in numbers])
    for p in clothes:
        d = p.to_dict()
        assert d["unknown"] == (d["ood"]["value"] < rule_threshold(tiny_run))
        assert d["label"] == ("unknown" if p.unknown else p.top[0][0])
    off = tiny_run.predict(list(fashion), reject=False)
    assert not any(p.unknown for p in off) and all(p.label in tiny_run.classes for p in off)
    assert [p.top for p in off] == [p.top for p in clothes]  # the ranking is unchanged


def rule_threshold(run) -> float:
    return run.rejection["threshold"]


def _least_known(run, images: torch.Tensor) -> torch.Tensor:
    """The image of ``images`` with the lowest energy: well below the threshold."""
    _, energy = run.outputs(images)
    i = int(energy.argmin())
    assert float(energy[i]) < rule_threshold(run) - 0.5
    return images[i, 0]


def test_cli_predict_prints_unknown_and_reject_off_answers(tiny_run, tmp_path, capsys):
    digits = load_dataset("mnist", val_split=0).test.images[:500]
    path = tmp_path / "odd.png"
    Image.fromarray(_least_known(tiny_run, digits).numpy()).save(path)
    assert main(["predict", str(tiny_run.path), str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: unknown (energy " in out and "--reject off" in out
    assert main(["predict", str(tiny_run.path), str(path), "--reject", "off"]) == 0
    assert capsys.readouterr().out.split(": ")[1].split()[0] in tiny_run.classes
    table = tmp_path / "out.csv"
    assert main(["predict", str(tiny_run.path), str(path), "--output", str(table)]) == 0
    header, row = table.read_text().splitlines()
    assert header.split(",")[-3:] == ["answer", "ood_score", "error"]
    assert row.split(",")[-3] == "unknown"


def test_onnx_export_carries_the_score_and_the_rule(tiny_run, tmp_path, fashion_dir):
    pytest.importorskip("onnxruntime")
    import cnnkit
    from cnnkit.deploy.export import export_metadata, export_onnx, read_metadata

    result = export_onnx(tiny_run, tmp_path / "m.onnx", check_images=500)
    assert result.parity["max_score_difference"] < 1e-4  # ood_score against PyTorch, fp32
    meta = read_metadata(result.path)["rejection"]
    assert meta["score"] == "energy" and meta["output"] == "ood_score"
    assert meta["threshold"] == rule_threshold(tiny_run)
    model = cnnkit.load(result.path)
    fashion, digits = _fashion_and_digits(100)
    images = list(torch.cat([fashion, digits]))
    exported = model.predict(images)
    reference = tiny_run.predict(images)
    same = [a.unknown == b.unknown for a, b in zip(exported, reference, strict=True)]
    # the run may compute in bf16 where the file computes in fp32: a near-tie may differ
    assert np.mean(same) >= 0.98 and any(p.unknown for p in exported)
    assert not any(p.unknown for p in model.predict(images, reject=False))
    # phone files have only the probabilities: the max-softmax threshold fitted beside it
    phone = export_metadata(tiny_run)["rejection"]
    assert phone["score"] == "max_softmax" and phone["output"] == "probabilities"
    assert phone["threshold"] == tiny_run.rejection["thresholds"]["max_softmax"]


def test_export_with_reject_off_has_neither_output_nor_rule(tiny_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from cnnkit.deploy.export import read_metadata

    out = tmp_path / "plain.onnx"
    assert main(["export", str(tiny_run.path), "--out", str(out), "--reject", "off"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    assert "rejection" not in read_metadata(out)
    details = json.loads(out.with_suffix(".json").read_text())
    assert "max_score_difference" not in details["parity"]


def test_the_service_applies_the_rule_of_the_run_and_of_its_onnx_file(tiny_run, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("onnxruntime")
    from cnnkit.deploy.export import export_onnx
    from cnnkit.deploy.serve import Predictor

    digits = load_dataset("mnist", val_split=0).test.images[:500]
    odd = _least_known(tiny_run, digits)
    batch = torch.stack([odd[None], digits[0]])
    path = export_onnx(tiny_run, tmp_path / "m.onnx", check_images=200).path
    for predictor in (Predictor(tiny_run.path), Predictor(path)):
        assert predictor.describe()["rejection"] == {
            "score": "energy",
            "threshold": rule_threshold(tiny_run),
        }
        (_, low), (_, high) = predictor.rows(batch)
        assert low < rule_threshold(tiny_run) <= high
    assert Predictor(path, reject=False).rows(batch)[0][1] is None


def test_the_acceptance_is_a_setting(tmp_path, capsys):
    import cnnkit

    run = cnnkit.train(
        data="mnist", epochs=1, limit=500, accept=0.8, runs_dir=str(tmp_path), quiet=True
    )
    assert run.rejection["acceptance"] == 0.8
    assert run.rejection["val_rejected"] == pytest.approx(0.2, abs=0.002)
    assert main(["train", "--data", "mnist", "--accept", "1.5"]) == 1
    assert capsys.readouterr().err == (
        "error: train.accept = 1.5 must be between 0 and 1, e.g. 0.95\n"
    )
