"""``cnnkit export --format triton``: the model repository, checked without a Triton server."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

from google.protobuf import text_format  # noqa: E402

from cnnkit.deploy.triton import (  # noqa: E402
    TritonRepositoryError,
    check_repository,
    export_triton,
    model_name,
)

ORT_TO_TRITON = {"tensor(uint8)": "TYPE_UINT8", "tensor(float)": "TYPE_FP32"}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    return export_triton(tiny_run, tmp_path_factory.mktemp("repo"), name="digits")


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_layout_and_config_match_the_onnx_file(tiny_run, exported):
    tmp = Path(exported.model_dir)
    assert sorted(p.name for p in tmp.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert (tmp / "1" / "model.onnx").is_file()
    config = _parse(tmp / "config.pbtxt")
    assert config.name == "digits" == tmp.name
    assert config.backend == "onnxruntime"
    assert config.max_batch_size > 0
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds > 0

    session = _session(tmp / "1" / "model.onnx")
    dtype = model_config_pb2.DataType.Name
    for declared, actual in (
        (config.input, session.get_inputs()),
        (config.output, session.get_outputs()),
    ):
        assert [t.name for t in declared] == [t.name for t in actual]
        for d, a in zip(declared, actual, strict=True):
            assert dtype(d.data_type) == ORT_TO_TRITON[a.type]
            assert isinstance(a.shape[0], str)  # dynamic batch dimension
            # one value per image: Triton's dims [1], the model's own shape [] (reshape)
            shape = list(d.reshape.shape) if d.HasField("reshape") else list(d.dims)
            assert shape == list(a.shape[1:])
    (images,), (probabilities, score) = config.input, config.output
    assert images.name == "images" and dtype(images.data_type) == "TYPE_UINT8"
    c, (h, w) = tiny_run.preprocessing["channels"], tiny_run.preprocessing["size"]
    assert list(images.dims) == [c, h, w]
    assert probabilities.name == "probabilities" and dtype(probabilities.data_type) == "TYPE_FP32"
    assert list(probabilities.dims) == [len(tiny_run.classes)]
    assert probabilities.label_filename == "labels.txt"
    assert score.name == "ood_score" and list(score.dims) == [1]
    rule = json.loads(config.parameters["cnnkit.rejection"].string_value)
    assert rule["score"] == "energy" and rule["threshold"] == tiny_run.rejection["threshold"]
    labels = (tmp / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert labels == list(tiny_run.classes)
    assert "cnnkit.preprocessing" in config.parameters
    assert exported.checks and any("ModelConfig" in line for line in exported.checks)


def test_model_agrees_with_pytorch_on_real_digits(tiny_run, exported):
    from cnnkit.deploy.export import _model_inputs

    images, labels = _model_inputs(tiny_run, "val", 16)
    assert images.dtype == np.uint8 and images.ndim == 4
    onnx_probs = _session(exported.model).run(None, {"images": images})[0]
    pre = tiny_run.preprocessing
    mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
    model = tiny_run.model.to("cpu").eval()
    with torch.no_grad():
        logits = model((torch.from_numpy(images).float() / 255 - mean) / std)
    assert (onnx_probs.argmax(1) == logits.argmax(1).numpy()).all()
    assert np.allclose(onnx_probs.sum(1), 1, atol=1e-5)
    assert (onnx_probs.argmax(1) == labels).mean() > 0.5  # a trained model, real digits


def test_cli_writes_the_repository_and_prints_the_server_command(tiny_run, tmp_path, capsys):
    from cnnkit.cli import main

    out = tmp_path / "models"
    assert main(["export", str(tiny_run.path), "--format", "triton", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    name = model_name(tiny_run.path)
    assert (out / name / "config.pbtxt").is_file()
    assert (out / name / "1" / "model.onnx").is_file()
    assert "tritonserver --model-repository=/models" in printed
    assert f"-v {out.resolve()}:/models" in printed
    assert "no Triton server was run" in printed


def test_cli_refuses_quantize_and_nhwc(tiny_run, tmp_path, capsys):
    from cnnkit.cli import main

    base = ["export", str(tiny_run.path), "--format", "triton", "--out", str(tmp_path)]
    assert main([*base, "--quantize", "int8"]) == 1
    assert main([*base, "--layout", "nhwc"]) == 1
    err = capsys.readouterr().err
    assert "--quantize is for --format onnx" in err and "--layout is for --format onnx" in err
    assert not list(tmp_path.iterdir())


def test_model_name_is_sanitised(tmp_path):
    assert model_name(tmp_path / "mnist seed.cnn+v2") == "mnist_seed_cnn_v2"
    assert model_name(tmp_path / "runs-1_a") == "runs-1_a"


def test_bad_name_is_refused(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="letters, digits"):
        export_triton(tiny_run, tmp_path, name="my model")


@pytest.mark.parametrize(
    "old, new, match",
    [
        ("dims: [ 10 ]", "dims: [ 9 ]", "dims"),
        ("data_type: TYPE_UINT8", "data_type: TYPE_FP32", "TYPE_FP32"),
        ('name: "probabilities"', 'name: "probs"', "output names"),
        ("max_batch_size: 64", "max_batch_size: 64\nbogus_field: 1", "not a valid Triton"),
        ('name: "digits"', 'name: "other"', "differs from its directory"),
    ],
)
def test_corrupted_config_is_caught(exported, tmp_path, old, new, match):
    copy = tmp_path / "digits"
    shutil.copytree(exported.model_dir, copy)
    check_repository(copy)  # the copy itself passes
    config = copy / "config.pbtxt"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    with pytest.raises(TritonRepositoryError, match=match):
        check_repository(copy)


def test_short_labels_file_is_caught(exported, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(exported.model_dir, copy)
    labels = copy / "labels.txt"
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines()[:-1]))
    with pytest.raises(TritonRepositoryError, match="9 lines for 10"):
        check_repository(copy)
