"""Files for phone runtimes (deploy/mobile.py): each loaded by its runtime where it runs on
Linux and compared with PyTorch on real MNIST digits, its labels and preprocessing inside,
int8 within a few points, a disagreeing or corrupt file refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest

from cnnkit.cli import main
from cnnkit.deploy.export import ExportMismatchError, _model_inputs

pytest.importorskip("onnxruntime")
from cnnkit.deploy.mobile import (  # noqa: E402
    RUNTIME_PACKAGES,
    describe_coreml,
    export_mobile,
    read_pte_metadata,
    require,
    runtime_predictor,
    torch_probabilities,
)


@pytest.fixture(scope="module")
def digits(tiny_run):
    """(uint8 NCHW validation digits, labels, PyTorch's probabilities of them)."""
    from cnnkit.deploy.export import images_to_probabilities

    images, labels = _model_inputs(tiny_run, "val", 300)
    return images, labels, torch_probabilities(images_to_probabilities(tiny_run), images)


def _agrees(path, digits) -> None:
    """The file's own runtime, loaded afresh, gives PyTorch's probabilities."""
    images, _, reference = digits
    probs = runtime_predictor(path)(images)
    assert probs.shape == reference.shape
    assert (probs.argmax(1) == reference.argmax(1)).all()
    assert np.abs(probs - reference).max() < 1e-4


def test_ort_format(tiny_run, digits, tmp_path):
    import onnxruntime as ort

    result = export_mobile(tiny_run, "ort", tmp_path / "m.ort", quantize="int8", check_images=300)
    assert result.parity["images"] == 300 and result.parity["top1_agreement"] == 1.0
    _agrees(tmp_path / "m.ort", digits)
    meta = ort.InferenceSession(str(tmp_path / "m.ort")).get_modelmeta().custom_metadata_map
    assert json.loads(meta["cnnkit.classes"]) == tiny_run.classes
    assert json.loads(meta["cnnkit.preprocessing"])["input_dtype"] == "uint8"
    q = result.int8
    assert (tmp_path / "m-int8.ort").exists() and q["size_bytes"]["int8"] < q["size_bytes"]["fp32"]
    assert abs(q["accuracy_change_points"]) < 3, q
    details = json.loads((tmp_path / "m.ort.json").read_text())
    assert details["checkpoint"] == tiny_run.checkpoint_ref and details["parity"] == result.parity


def test_executorch_format(tiny_run, digits, tmp_path):
    pytest.importorskip("executorch")
    path = tmp_path / "m.pte"
    result = export_mobile(tiny_run, "executorch", path, quantize="int8", check_images=300)
    assert result.parity["top1_agreement"] == 1.0
    _agrees(path, digits)
    images, _, reference = digits
    one = runtime_predictor(path)(images[:1])  # a single image, as an app sends it
    assert one.argmax(1)[0] == reference.argmax(1)[0]
    meta = read_pte_metadata(path)
    assert meta["classes"] == tiny_run.classes
    assert meta["preprocessing"]["mean"] == list(tiny_run.preprocessing["mean"])
    # int8: the .pte checked against the quantized PyTorch model it was lowered from; kept
    # when they agree, refused (renamed) when XNNPACK's lowering does not reproduce it
    q = result.int8
    lowering = q["vs_quantized_pytorch"]
    if "refused" in q:
        assert lowering["top1_agreement"] < 0.99 and result.int8_path is None, q
        assert (tmp_path / "m-int8.rejected.pte").exists()
        assert not (tmp_path / "m-int8.pte").exists()
    else:
        assert lowering["top1_agreement"] >= 0.99 and (tmp_path / "m-int8.pte").exists(), q
        assert abs(q["accuracy_change_points"]) < 3, q


def test_coreml_format(tiny_run, tmp_path):
    pytest.importorskip("coremltools")
    path = tmp_path / "m.mlpackage"
    result = export_mobile(tiny_run, "coreml", path, quantize="int8")
    assert result.parity is None  # Core ML predicts on Apple systems only
    found = describe_coreml(path)
    assert found["labels"] == tiny_run.classes
    assert found["input"] == {"name": "image", "width": 28, "height": 28, "color": "GRAYSCALE"}
    assert {"conv", "softmax", "classify"} <= set(found["operations"])
    assert found["metadata"]["preprocessing"]["std"] == list(tiny_run.preprocessing["std"])
    int8 = describe_coreml(tmp_path / "m-int8.mlpackage")
    assert "constexpr_affine_dequantize" in int8["operations"], int8["operations"]


def test_a_disagreeing_file_is_refused(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("executorch")
    import cnnkit.deploy.export as export

    monkeypatch.setattr(export, "MAX_PROBABILITY_DIFFERENCE", -1.0)  # nothing can pass
    with pytest.raises(ExportMismatchError, match="ExecuTorch export disagrees"):
        export_mobile(tiny_run, "executorch", tmp_path / "m.pte", check_images=50)
    assert not (tmp_path / "m.pte").exists() and (tmp_path / "m.rejected.pte").exists()


@pytest.mark.parametrize("fmt", ["ort", "executorch"])
def test_a_corrupt_file_is_refused_in_one_line(tiny_run, tmp_path, fmt):
    pytest.importorskip(RUNTIME_PACKAGES[fmt])
    suffix = ".ort" if fmt == "ort" else ".pte"
    path = Path(export_mobile(tiny_run, fmt, tmp_path / f"m{suffix}").path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated, as by an interrupted copy
    with pytest.raises(ValueError, match="cannot load it") as e:
        runtime_predictor(path)(np.zeros((1, 1, 28, 28), np.uint8))
    assert "\n" not in str(e.value)


def test_cli_export_for_a_phone(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "phone.ort"
    assert main(["export", str(tiny_run.path), "--format", "ort", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in printed and f"details: {out}.json" in printed
    assert (
        main(["export", str(tiny_run.path), "--format", "ort", "--out", str(tmp_path / "x")]) == 1
    )
    assert "writes a .ort file" in capsys.readouterr().err
    monkeypatch.setitem(RUNTIME_PACKAGES, "coreml", "no_such_converter_package")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'cnnkit\[coreml\]'"):
        require("coreml")
