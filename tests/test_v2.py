"""The Open Inference Protocol (KServe v2) of ``cnnkit serve``: the official Triton client
against a live server, and the protocol's errors."""

import json
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import cnnkit.deploy.serve as serve  # noqa: E402
from cnnkit.data import load_dataset  # noqa: E402
from test_serve import StubPredictor  # noqa: E402


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(serve, "Predictor", StubPredictor)
    app = serve.create_app(
        "stub", max_wait_ms=1, max_upload_bytes=50_000, max_pixels=10_000, max_request_pixels=640
    )
    with TestClient(app) as c:
        yield c


def infer_json(data, shape, datatype="UINT8", name="images", **extra) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}], **extra}


def error(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


def test_json_inference_and_classification(stub):
    images = [[0] * 64, [255] * 64]
    r = stub.post(
        "/v2/models/stub/infer",
        json=infer_json(
            [images[0], images[1]],  # nested lists are fine too
            [2, 1, 8, 8],
            id="req-7",
            outputs=[
                {"name": "probabilities"},
                {"name": "probabilities", "parameters": {"classification": 2}},
            ],
        ),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == "stub"
    probs, classes = body["outputs"]
    assert probs["datatype"] == "FP32" and probs["shape"] == [2, 3]
    p = np.array(probs["data"]).reshape(2, 3)
    assert p.argmax(1).tolist() == [0, 2] and np.allclose(p.sum(1), 1, atol=1e-5)
    assert classes["datatype"] == "BYTES" and classes["shape"] == [2, 2]
    assert classes["data"][0].split(":")[1:] == ["0", "dark"]
    assert classes["data"][2].split(":")[1:] == ["2", "bright"]
    assert float(classes["data"][0].split(":")[0]) == pytest.approx(p[0, 0], abs=1e-6)


def test_binary_request_and_response_by_hand(stub):
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, 1, 8, 8],
                    "parameters": {"binary_data_size": 64},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    r = stub.post(
        "/v2/models/stub/versions/1/infer",
        content=header + bytes([255] * 64),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    [out] = meta["outputs"]
    assert out["parameters"]["binary_data_size"] == 12 and out["shape"] == [1, 3]
    assert np.frombuffer(r.content[n:], "<f4").argmax() == 2


def test_protocol_errors(stub):
    ok = [0] * 64
    post = stub.post
    assert "shape" in error(post("/v2/models/stub/infer", json=infer_json(ok, [1, 3, 8, 8])), 400)
    assert "shape" in error(post("/v2/models/stub/infer", json=infer_json(ok, [1, 8, 8])), 400)
    assert "UINT8" in error(
        post("/v2/models/stub/infer", json=infer_json(ok, [1, 1, 8, 8], "FP32")), 400
    )
    assert "63" in error(post("/v2/models/stub/infer", json=infer_json(ok[1:], [1, 1, 8, 8])), 400)
    assert "0 to 255" in error(
        post("/v2/models/stub/infer", json=infer_json([256] * 64, [1, 1, 8, 8])), 400
    )
    assert "0 to 255" in error(
        post("/v2/models/stub/infer", json=infer_json([0.5] * 64, [1, 1, 8, 8])), 400
    )
    assert "unknown input" in error(
        post("/v2/models/stub/infer", json=infer_json(ok, [1, 1, 8, 8], name="x")), 400
    )
    bad_output = infer_json(ok, [1, 1, 8, 8], outputs=[{"name": "logits"}])
    assert "unknown output" in error(post("/v2/models/stub/infer", json=bad_output), 400)
    too_many = infer_json(
        ok, [1, 1, 8, 8], outputs=[{"name": "probabilities", "parameters": {"classification": 4}}]
    )
    assert "classification" in error(post("/v2/models/stub/infer", json=too_many), 400)
    assert "JSON" in error(post("/v2/models/stub/infer", content=b"{not json"), 400)
    # 640 pixels a request: ten 8x8 images
    assert "limit" in error(
        post("/v2/models/stub/infer", json=infer_json([0] * 64 * 11, [11, 1, 8, 8])), 413
    )
    big = infer_json([100] * 20_000, [1, 1, 8, 8])  # over max_upload_bytes (50,000)
    assert "limit" in error(post("/v2/models/stub/infer", json=big), 413)
    for path in ("/v2/models/other", "/v2/models/other/ready", "/v2/models/stub/versions/2"):
        assert "other" in error(stub.get(path), 404) or "version" in error(stub.get(path), 404)
    assert "other" in error(post("/v2/models/other/infer", json=infer_json(ok, [1, 1, 8, 8])), 404)
    header = b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 8, 8], '
    header += b'"parameters": {"binary_data_size": 64}}]}'
    short = post(
        "/v2/models/stub/infer",
        content=header + bytes(60),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert "binary_data_size" in error(short, 400)


def test_health_metadata_and_metrics_by_template(stub):
    assert stub.get("/v2").json()["extensions"] == ["classification", "binary_tensor_data"]
    assert stub.get("/v2/health/live").json() == {"live": True}
    assert stub.get("/v2/health/ready").json() == {"ready": True}
    assert stub.get("/v2/models/stub/versions/1/ready").json() == {"name": "stub", "ready": True}
    meta = stub.get("/v2/models/stub").json()
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["parameters"]["labels"] == ["dark", "mid", "bright"]
    stub.get("/v2/models/nonsense-name")
    text = stub.get("/metrics").text
    assert 'path="/v2/models/{model}"' in text and "nonsense-name" not in text


# ---------------------------------------------------------------- the official client, live


@contextmanager
def live(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_official_triton_client(tiny_run):
    httpclient = pytest.importorskip("tritonclient.http")
    data = load_dataset("mnist", val_split=0).test
    images = data.images[:8].numpy().astype(np.uint8)  # (8, 1, 28, 28)
    expected = [p.label for p in tiny_run.predict([Image.fromarray(im[0]) for im in images])]
    name = tiny_run.path.name
    with live(serve.create_app(tiny_run.path, max_wait_ms=5)) as port:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(name)
        assert not client.is_model_ready("no-such-model")
        meta = client.get_model_metadata(name)
        assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
        assert meta["outputs"] == [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(tiny_run.classes)]}
        ]
        assert meta["parameters"]["labels"] == list(tiny_run.classes)
        assert client.get_server_metadata()["name"] == "cnnkit"

        for binary in (True, False):
            tensor = httpclient.InferInput("images", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
            result = client.infer(name, [tensor], outputs=outputs, request_id="r1")
            probs = result.as_numpy("probabilities")
            assert probs.shape == (8, len(tiny_run.classes)) and probs.dtype == np.float32
            assert [tiny_run.classes[i] for i in probs.argmax(1)] == expected
            assert result.get_response()["id"] == "r1"
        # no outputs named: the client asks for them all, in binary
        assert client.infer(name, [tensor]).as_numpy("probabilities").shape == (8, 10)

        top3 = httpclient.InferRequestedOutput("probabilities", class_count=3)
        result = client.infer(name, [tensor], outputs=[top3])
        entries = result.as_numpy("probabilities")
        assert entries.shape == (8, 3)
        for row, label in zip(entries, expected, strict=True):
            parts = [e.decode().split(":") for e in row]
            scores = [float(s) for s, _, _ in parts]
            assert scores == sorted(scores, reverse=True)
            assert parts[0][2] == label and tiny_run.classes[int(parts[0][1])] == label

        from tritonclient.utils import InferenceServerException

        wrong = httpclient.InferInput("images", [1, 1, 27, 28], "UINT8")
        wrong.set_data_from_numpy(np.zeros((1, 1, 27, 28), np.uint8))
        with pytest.raises(InferenceServerException, match="shape"):
            client.infer(name, [wrong])
        client.close()
