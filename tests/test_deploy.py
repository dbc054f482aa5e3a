import importlib.util
import io
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnkit
from cnnkit.cli import main
from cnnkit.data import load_dataset

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cnnkit.deploy.export import ExportMismatchError, export_onnx, read_metadata  # noqa: E402
from cnnkit.deploy.serve import create_app  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The first MNIST test digits as PNG bytes, with their labels."""
    data = load_dataset("mnist", val_split=0).test
    out = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(data.images[i, 0].numpy()).save(buf, format="PNG")
        out.append((buf.getvalue(), str(int(data.labels[i]))))
    return out


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "mnist.onnx"
    return export_onnx(tiny_run, path, quantize="int8")


def test_seed_cnn_export_matches_and_int8_stays_within_a_point(tiny_run, exported, digits):
    assert exported.parity["top1_agreement"] == 1.0
    assert exported.parity["max_probability_difference"] < 1e-4
    assert abs(exported.int8["accuracy_change_points"]) <= 1.0, exported.int8
    meta = read_metadata(exported.path)
    assert meta["classes"] == tiny_run.classes
    assert (
        meta["preprocessing"]["normalised_in_graph"] and meta["provenance"]["model"] == "seed-cnn"
    )
    saved = json.loads(Path(exported.path).with_suffix(".json").read_text())
    assert saved["parity"] == exported.parity
    # the file alone predicts as the run does
    onnx_model = cnnkit.load(exported.path)
    images = [Image.open(io.BytesIO(png)) for png, _ in digits]
    assert [p.label for p in onnx_model.predict(images)] == [
        p.label for p in tiny_run.predict(images)
    ]
    int8 = cnnkit.load(exported.int8_path)
    assert int8.metadata["quantization"] == "int8 static"


def test_resnet_export_in_nhwc(mnist_dir, tmp_path):
    run = cnnkit.train(model="resnet20", epochs=1, limit=300, runs_dir=str(tmp_path), quiet=True)
    result = export_onnx(run, tmp_path / "r.onnx", layout="nhwc", check_images=500)
    assert result.parity["top1_agreement"] == 1.0
    assert result.parity["max_probability_difference"] < 1e-4
    model = cnnkit.load(tmp_path / "r.onnx")
    assert model.session.get_inputs()[0].shape[1:] == [28, 28, 1]


def test_pretrained_backbone_export(cats_run, cats_dogs_dir, tmp_path):
    run = cats_run
    result = export_onnx(run, tmp_path / "cats.onnx", check_images=100)
    assert result.parity["top1_agreement"] == 1.0
    assert result.parity["max_probability_difference"] < 1e-4
    cat = cats_dogs_dir / "validation" / "cats" / "cat.900.jpg"
    assert cnnkit.load(tmp_path / "cats.onnx").predict(cat)[0].label == run.predict(cat)[0].label


def test_a_disagreeing_export_fails_loudly(tiny_run, tmp_path, monkeypatch):
    import cnnkit.deploy.export as export

    monkeypatch.setattr(export, "MAX_PROBABILITY_DIFFERENCE", -1.0)  # nothing can pass
    with pytest.raises(ExportMismatchError, match="disagrees with the model"):
        export_onnx(tiny_run, tmp_path / "m.onnx", check_images=100)
    assert not (tmp_path / "m.onnx").exists() and (tmp_path / "m.rejected.onnx").exists()


def test_export_and_predict_commands(tiny_run, tmp_path, digits, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["export", str(tiny_run.path), "--out", str(out)]) == 0
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
    png = tmp_path / "d.png"
    png.write_bytes(digits[0][0])
    assert main(["predict", str(out), str(png), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)["predictions"][0]
    assert pred["label"] == tiny_run.predict(png)[0].label


# ---------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(
        create_app(tiny_run.path, max_wait_ms=50, max_upload_bytes=200_000, max_pixels=1_000_000)
    ) as c:
        yield c


def files(*items):
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def test_predict_multipart_raw_and_per_file_errors(client, tiny_run, digits):
    png, _ = digits[0]
    expected = tiny_run.predict(Image.open(io.BytesIO(png)))[0]
    r = client.post("/v1/predict", files=files(("a.png", png)))
    assert r.status_code == 200
    p = r.json()["predictions"][0]
    assert p["label"] == expected.label and len(p["top"]) == 5
    assert p["top"][0]["probability"] == pytest.approx(expected.top[0][1], abs=1e-5)

    r = client.post("/v1/predict?k=2", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 2

    r = client.post(
        "/v1/predict",
        files=files(
            ("a.png", png), ("notes.txt", b"hello"), ("cut.png", png[:80]), ("b.png", digits[1][0])
        ),
    )
    assert r.status_code == 200
    got = r.json()["predictions"]
    assert [g.get("error", {}).get("status") for g in got] == [None, 415, 422, None]
    assert "not an image" in got[1]["error"]["message"]
    assert "truncated" in got[2]["error"]["message"]


def test_input_errors(client, digits):
    r = client.post(
        "/v1/predict", content=b"GIF89a not really", headers={"content-type": "image/gif"}
    )
    assert r.status_code in (415, 422) and "error" in r.json()["predictions"][0]
    r = client.post("/v1/predict", files=files(("x.txt", b"plain text")))
    assert r.status_code == 415
    assert client.post("/v1/predict", content=b"").status_code == 422
    big = client.post("/v1/predict", content=b"\0" * 300_000, headers={"content-type": "image/png"})
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    # a small file that decodes to too many pixels (a decompression bomb) is refused unread
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    r = client.post("/v1/predict", files=files(("bomb.png", buf.getvalue())))
    assert (
        r.status_code == 413
        and "4,000,000 pixels" in r.json()["predictions"][0]["error"]["message"]
    )


def test_model_health_docs_page_and_explain(client, tiny_run, digits):
    assert client.get("/healthz").json() == {"status": "ok", "worker": os.getpid()}
    info = client.get("/v1/model").json()
    assert info["classes"] == tiny_run.classes and info["input"]["size"] == [28, 28]
    assert info["backend"] == "torch" and info["explain"] is True
    # Swagger UI served from this machine when fastapi-offline is installed, else no /docs
    has_offline_docs = importlib.util.find_spec("fastapi_offline") is not None
    assert client.get("/docs").status_code == (200 if has_offline_docs else 404)
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/").text
    assert 'id="drop"' in page and "v1/predict" in page
    r = client.post("/v1/explain", files=files(("a.png", digits[0][0])))
    assert r.status_code == 200 and r.json()["overlay"].startswith("data:image/png;base64,")


def test_concurrent_requests_are_batched_and_counted(client, digits):
    def one(i):
        return client.post("/v1/predict", files=files(("d.png", digits[i % 8][0]))).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(32))) == {200}
    text = client.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    batch = {
        s.name + s.labels.get("le", ""): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "cnnkit_batch_size"
        for s in f.samples
    }
    # some requests shared a batch: not every batch is in the "at most 1" bucket
    assert batch["cnnkit_batch_size_bucket1.0"] < batch["cnnkit_batch_size_count"], batch
    assert 'cnnkit_requests_total{path="/v1/predict",status="200"}' in text
    assert "cnnkit_request_latency_seconds_bucket" in text
    assert 'cnnkit_input_errors_total{status="415"}' in text


def test_onnx_backend(exported, digits):
    with TestClient(create_app(exported.path)) as c:
        assert c.get("/v1/model").json()["backend"] == "onnx"
        r = c.post("/v1/predict", files=files(("a.png", digits[0][0])))
        assert r.status_code == 200
        assert c.post("/v1/explain", files=files(("a.png", digits[0][0]))).status_code == 501


# ---------------------------------------------------------------- in a real browser


@pytest.fixture
def live_server(tiny_run):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(tiny_run.path), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


def test_web_page_in_chromium(browser, live_server, tiny_run, digits, tmp_path):
    # a digit the model gets right, as a person would upload it: a PNG file
    png, label = next(
        (p, lb) for p, lb in digits if tiny_run.predict(Image.open(io.BytesIO(p)))[0].label == lb
    )
    path = tmp_path / f"digit-{label}.png"
    path.write_bytes(png)
    broken = tmp_path / "broken.png"
    broken.write_bytes(png[:60])  # a PNG cut short: the service answers 422
    from playwright.sync_api import expect  # its waits run outside the page's CSP

    page = browser.new_page()
    failed: list[str] = []  # requests that failed, and what the console complained of
    page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
    page.on("console", lambda m: m.type == "error" and failed.append(m.text))
    page.goto(live_server)
    expect(page.locator("#info")).to_contain_text("classes")
    info = page.inner_text("#info")
    assert "seed-cnn" in info and "10 classes" in info and "validation accuracy" in info
    # the empty page: no image box (a broken-image icon), no error
    assert not page.is_visible("#view") and not page.is_visible("#preview")
    assert page.inner_text("#error") == ""
    page.set_input_files("#file", str(path))
    expect(page.locator("#label")).not_to_have_text(re.compile(r"^(|\.\.\.)$"))
    assert page.inner_text("#label") == label
    assert page.locator("#bars .bar").count() == 5
    page.check("#cam-toggle")
    expect(page.locator("#overlay")).to_have_attribute("src", re.compile("^data:"))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)
    assert failed == []  # the favicon, the page's script and style (CSP) all load
    # a failed upload after a good one: its error, and nothing left of the last image
    page.set_input_files("#file", str(broken))
    expect(page.locator("#error")).not_to_be_empty()
    assert "truncated" in page.inner_text("#error")
    assert not page.is_visible("#view") and not page.is_visible("#overlay")
    assert page.get_attribute("#preview", "src") is None
    assert page.inner_text("#label") == "" and page.locator("#bars .bar").count() == 0
    page.screenshot(path=str(ARTIFACTS / "serve-page-error.png"), full_page=True)
    page.close()
    assert np.asarray(Image.open(ARTIFACTS / "serve-page.png")).std() > 0
    assert [f for f in failed if "422" not in f] == []  # only the 422 itself, and its log
    assert f"422 {live_server}v1/predict" in failed
    if importlib.util.find_spec("fastapi_offline") is None:
        return  # no /docs to show without Swagger UI's files
    # /docs: Swagger UI from this server (no network here: a CDN could not load)
    failed.clear()
    docs = browser.new_page()
    docs.on("console", lambda m: m.type == "error" and failed.append(m.text))
    docs.goto(live_server + "docs")
    expect(docs.locator(".swagger-ui .title")).to_contain_text("cnnkit")
    expect(docs.locator(".opblock-summary-path").first).to_be_visible()
    docs.close()
    assert failed == []
