"""The HTTP API's statuses and error shapes, over a stub model (no training, no ONNX)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import cnnkit.deploy.serve as serve  # noqa: E402


class StubPredictor:
    """Three classes on 8x8 grey images; the brighter the image, the more 'bright'."""

    def __init__(self, path, backend="auto"):
        self.classes = ["dark", "mid", "bright"]
        self.preprocessing = {"channels": 1, "size": [8, 8]}
        self.can_explain = False

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        m = images.float().mean(dim=(1, 2, 3)) / 255
        logits = torch.stack([1 - m, torch.full_like(m, 0.5), m], dim=1) * 10
        return torch.softmax(logits, dim=1).numpy()

    def describe(self) -> dict:
        return {"backend": "stub", "classes": self.classes}


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(serve, "Predictor", StubPredictor)
    app = serve.create_app("stub", max_wait_ms=1, max_upload_bytes=50_000, max_pixels=10_000)
    with TestClient(app) as c:
        yield c


def png(value: int = 255, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_header_only() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    return buf.getvalue()[:6]  # Image.open itself raises OSError on this


def files(*items):
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def test_top_k_and_label(client):
    r = client.post("/v1/predict?k=2", files=files(("white.png", png(255))))
    assert r.status_code == 200
    [p] = r.json()["predictions"]
    assert p["file"] == "white.png" and p["label"] == "bright"
    assert [t["class"] for t in p["top"]] == ["bright", "mid"]
    assert p["top"][0]["probability"] > p["top"][1]["probability"]
    r = client.post("/v1/predict", content=png(0), headers={"content-type": "image/png"})
    assert r.json()["predictions"][0]["file"] == "body"
    assert len(r.json()["predictions"][0]["top"]) == 3  # k=5 capped at the classes


def test_each_file_gets_its_own_status(client):
    r = client.post(
        "/v1/predict",
        files=files(
            ("ok.png", png()),
            ("empty.png", b""),
            ("notes.txt", b"hello"),
            ("header.jpg", jpeg_header_only()),
            ("big.png", png(size=(200, 100))),
            ("huge.png", b"\0" * 50_001),
        ),
    )
    assert r.status_code == 200
    got = r.json()["predictions"]
    assert [g.get("error", {}).get("status") for g in got] == [None, 422, 415, 422, 413, 413]
    assert got[1]["error"] == {"status": 422, "message": "empty file"}
    assert got[2]["error"]["message"] == serve.NOT_AN_IMAGE
    assert got[3]["error"]["message"].startswith("truncated or corrupt image (")
    assert got[4]["error"]["message"] == "image is 200x100 = 20,000 pixels; the limit is 10,000"
    assert got[5]["error"]["message"] == "file larger than the limit of 50,000 bytes"


def test_when_no_file_decodes_the_first_error_is_the_status(client):
    r = client.post("/v1/predict", content=jpeg_header_only())
    assert r.status_code == 422 and set(r.json()) == {"predictions"}
    r = client.post("/v1/predict", files=files(("a.txt", b"x"), ("b.png", b"")))
    assert r.status_code == 415


def test_pillows_decompression_bomb_limit(client, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow refuses over twice this
    r = client.post("/v1/predict", files=files(("bomb.png", png())))
    assert r.status_code == 413
    assert r.json()["predictions"][0]["error"]["message"].startswith("image too large: ")


def test_whole_request_errors(client):
    def error(r):
        return r.status_code, r.json()

    assert error(client.post("/v1/predict", content=b"")) == (
        422,
        {
            "error": {
                "status": 422,
                "message": "empty body: send an image as the body or as multipart 'files'",
            }
        },
    )
    status, body = error(client.post("/v1/predict", content=b"\0" * 50_001))
    assert (
        status == 413 and body["error"]["message"] == "body larger than the limit of 50,000 bytes"
    )
    status, body = error(client.post("/v1/predict", content=b"\0" * 200_000))
    assert status == 413 and body["error"]["message"].startswith("upload of 200,000 bytes")
    r = client.post(
        "/v1/predict",
        content=b"--x\r\nContent-Disposition: form-data; name=note\r\n\r\nhi\r\n--x--\r\n",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert error(r) == (
        422,
        {"error": {"status": 422, "message": "no files in the form: send them as 'files'"}},
    )
    assert error(client.post("/v1/explain", files=files(("a.png", png())))) == (
        501,
        {"error": {"status": 501, "message": serve.EXPLAIN_NEEDS_TORCH}},
    )


def test_page_model_and_metrics(client):
    assert "cnnkit: 3 classes" in client.get("/").text
    assert client.get("/v1/model").json()["backend"] == "stub"
    client.post("/v1/predict", files=files(("x.txt", b"x")))
    text = client.get("/metrics").text
    assert 'cnnkit_input_errors_total{status="415"} 1' in text
    assert 'cnnkit_requests_total{path="/v1/predict",status="415"} 1' in text
