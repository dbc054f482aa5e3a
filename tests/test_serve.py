"""The HTTP API's statuses and error shapes, over a stub model (no training, no ONNX)."""

import importlib.util
import io
import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import cnnkit.deploy.guard as guard  # noqa: E402
import cnnkit.deploy.serve as serve  # noqa: E402
import cnnkit.deploy.uploads as uploads  # noqa: E402
from cnnkit.runs.reject import Rejection  # noqa: E402

# Swagger UI's files for an offline /docs come with the fastapi-offline package.
HAS_OFFLINE_DOCS = importlib.util.find_spec("fastapi_offline") is not None


class StubPredictor(serve.Predictor):
    """Three classes on 8x8 grey images; the brighter the image, the more 'bright'. Mid-grey
    images, where all three are about equally likely, are below its "unknown" threshold
    (top probability under 0.5) unless ``reject`` is False."""

    def __init__(self, path, backend="auto", reject=True):
        self.classes = ["dark", "mid", "bright"]
        self.preprocessing = {"channels": 1, "size": [8, 8]}
        self.can_explain = False
        self.path = Path(path)  # the model's name in the inference protocol: "stub"
        self.rejection = Rejection("max_softmax", 0.5) if reject else None
        self.thresholds = None  # one class per image

    def outputs(self, images: torch.Tensor) -> tuple[np.ndarray, None]:
        m = images.float().mean(dim=(1, 2, 3)) / 255
        logits = torch.stack([1 - m, torch.full_like(m, 0.5), m], dim=1) * 10
        return torch.softmax(logits, dim=1).numpy(), None

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
    assert len(r.json()["predictions"][0]["top"]) == 3  # the default k=5 capped at the classes


def test_an_image_below_the_threshold_is_unknown_with_its_score(monkeypatch):
    monkeypatch.setattr(serve, "Predictor", StubPredictor)
    for reject in (True, False):
        app = serve.create_app("stub", max_wait_ms=1, reject=reject)
        with TestClient(app) as c:
            r = c.post("/v1/predict", files=files(("grey.png", png(128)), ("w.png", png(255))))
        grey, white = r.json()["predictions"]
        assert grey["label"] == ("unknown" if reject else grey["top"][0]["class"])
        assert grey["top"][0]["probability"] < 0.5 and white["label"] == "bright"
        if reject:
            assert grey["unknown"] is True and white["unknown"] is False
            assert grey["ood"]["score"] == "max_softmax" and grey["ood"]["threshold"] == 0.5
            assert grey["ood"]["value"] == pytest.approx(grey["top"][0]["probability"])
        else:
            assert "unknown" not in grey and "ood" not in grey


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
    assert got[2]["error"]["message"] == uploads.NOT_AN_IMAGE
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
    assert 'cnnkit_input_errors_total{status="415"} 1.0' in text
    assert 'cnnkit_requests_total{path="/v1/predict",status="415"} 1.0' in text


# ---------------------------------------------------------------- hardening (issue "Hardening")


def error_of(r) -> tuple[int, dict]:
    return r.status_code, r.json()["error"]


@pytest.mark.parametrize("k", ["0", "-1", "-3", "4", "99"])
def test_k_outside_one_to_classes_is_a_422(client, k):
    r = client.post(f"/v1/predict?k={k}", files=files(("a.png", png())))
    assert error_of(r) == (
        422,
        {"status": 422, "message": f"k must be from 1 to 3 (the number of classes); got {k}"},
    )


def test_k_not_a_number_is_a_422_in_the_same_shape(client):
    status, error = error_of(client.post("/v1/predict?k=two", files=files(("a.png", png()))))
    assert status == 422 and error["status"] == 422 and error["message"].startswith("query.k: ")
    r = client.post("/v1/predict?k=3", files=files(("a.png", png())))
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 3


def encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16), 90).save(buf, format=fmt)
    return buf.getvalue()


def test_broken_ico_bmp_and_dds_get_their_own_errors(client):
    ico, bmp = encoded("ICO", "RGBA"), encoded("BMP")
    bad_depth = bytearray(bmp)
    bad_depth[28:30] = (7).to_bytes(2, "little")  # bits per pixel: 7 does not exist
    dds = bytearray(encoded("DDS", "RGBA"))
    dds[80:84] = (129).to_bytes(4, "little")  # pixel format flags Pillow raises NotImplemented on
    r = client.post(
        "/v1/predict",
        files=files(
            ("ok.png", png()),
            ("cut.ico", ico[:40]),
            ("cut.bmp", bmp[:30]),
            ("depth.bmp", bytes(bad_depth)),
            ("flags.dds", bytes(dds)),
            ("ok.bmp", bmp),
        ),
    )
    assert r.status_code == 200
    got = r.json()["predictions"]
    assert [g.get("error", {}).get("status") for g in got] == [None, 422, 422, 422, 422, None]
    assert got[0]["label"] == "bright" and got[5]["label"] in ("dark", "mid", "bright")
    # decode.open_image reports the DDS plugin's NotImplementedError as a corrupt image
    assert got[4]["error"]["message"].startswith("truncated or corrupt image (Unknown pixel")


def test_metrics_labels_are_route_templates_and_escaped(client):
    for i in range(30):
        assert client.get(f"/nothing-here/{i}").status_code == 404
    # decoded, the path closes the label, ends the line and starts a metric of its own
    crafted = client.get("/x%22%7D%201%0A%23%20TYPE%20boom%20counter%0Aboom%7Ba=%22")
    assert error_of(crafted) == (404, {"status": 404, "message": "Not Found"})
    client.get("/healthz")
    text = client.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: not broken
    assert "boom" not in families
    requests = {
        (s.labels["path"], s.labels["status"]): s.value
        for s in families["cnnkit_requests"].samples
        if s.name == "cnnkit_requests_total"
    }
    assert requests[(guard.UNMATCHED_PATH, "404")] == 31
    assert requests[("/healthz", "200")] == 1
    assert {path for path, _ in requests} <= {guard.UNMATCHED_PATH, "/healthz"}


def test_a_server_failure_is_a_json_500_and_counted(client, monkeypatch):
    def broken(images):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(client.app.state.batcher, "fn", broken)
    r = client.post("/v1/predict", files=files(("a.png", png())))
    assert error_of(r) == (500, {"status": 500, "message": "internal server error"})
    text = client.get("/metrics").text
    assert 'cnnkit_requests_total{path="/v1/predict",status="500"} 1.0' in text


def test_content_length_that_lies_is_still_limited(client):
    r = client.post("/v1/predict", content=b"\0" * 60_000, headers={"content-length": "100"})
    assert error_of(r) == (
        413,
        {"status": 413, "message": "body larger than the limit of 50,000 bytes"},
    )


@contextmanager
def live(app, **config) -> Iterator[tuple[str, int]]:
    """The app on a real uvicorn server at 127.0.0.1 (TestClient reads a body whole before
    the app sees it: streaming limits and timeouts need real sockets)."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(10)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), body


@pytest.fixture
def stub_app(monkeypatch):
    monkeypatch.setattr(serve, "Predictor", StubPredictor)

    def make(**kwargs):
        defaults = {"max_wait_ms": 1, "max_upload_bytes": 50_000, "max_pixels": 10_000}
        return serve.create_app("stub", **{**defaults, **kwargs})

    return make


def test_a_chunked_form_over_the_limit_is_cut_off_while_streaming(stub_app):
    with live(stub_app()) as (host, port), socket.create_connection((host, port), 10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n"
        )
        part = b'--xx\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        chunk = b"\0" * 16_384
        sent = 0
        # at most 32 MB, far more than the 50 KB limit: the server must answer long before
        for i in range(2048):
            data = part if i == 0 else chunk
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(data)
            if select.select([sock], [], [], 0)[0]:  # an answer is waiting
                break
        status, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["message"] == (
        "form larger than the limit of 50,000 bytes (and 65,536 bytes of form framing)"
    )
    assert sent < 8 * 2**20  # the socket buffers hold a few MB; not the 32 MB offered


def test_a_stalled_upload_gets_408(stub_app):
    app = stub_app(upload_timeout_s=0.5)
    with live(app) as (host, port), socket.create_connection((host, port), 10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
            b"Content-Type: image/png\r\n\r\n" + png()[:20]
        )
        t0 = time.monotonic()
        status, body = read_response(sock)  # the socket timeout (10 s) bounds the wait
    assert status == 408 and "did not arrive within 0.5 s" in json.loads(body)["error"]["message"]
    assert time.monotonic() - t0 < 5


def test_health_answers_while_images_decode(stub_app, monkeypatch):
    decoding = threading.Event()
    decode = serve.decode_upload

    def slow_decode(data, preprocessing, max_pixels):
        decoding.set()
        time.sleep(1.0)  # holds its thread as a 6000x6000 PNG would, without the memory
        return decode(data, preprocessing, max_pixels)

    monkeypatch.setattr(serve, "decode_upload", slow_decode)
    with TestClient(stub_app()) as c, ThreadPoolExecutor(1) as pool:
        heavy = pool.submit(c.post, "/v1/predict", files=files(("a.png", png()), ("b.png", png())))
        assert decoding.wait(5)
        t0 = time.monotonic()
        assert c.get("/healthz").status_code == 200
        assert time.monotonic() - t0 < 0.5
        assert heavy.result(10).status_code == 200


def test_decodes_are_bounded_across_requests(stub_app, monkeypatch):
    lock, running, most = threading.Lock(), [0], [0]
    decode = serve.decode_upload

    def counting_decode(data, preprocessing, max_pixels):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return decode(data, preprocessing, max_pixels)

    monkeypatch.setattr(serve, "decode_upload", counting_decode)
    with TestClient(stub_app(decode_threads=2)) as c, ThreadPoolExecutor(6) as pool:
        statuses = list(
            pool.map(lambda _: c.post("/v1/predict", files=files(("a.png", png()))), range(6))
        )
    assert {r.status_code for r in statuses} == {200}
    assert most[0] == 2


def test_a_request_has_a_pixel_budget(stub_app):
    with TestClient(stub_app(max_request_pixels=15_000)) as c:
        image = png(size=(80, 80))  # 6,400 pixels: two fit in 15,000, the third does not
        r = c.post("/v1/predict", files=files(("a.png", image), ("b.png", image), ("c.png", image)))
    got = r.json()["predictions"]
    assert r.status_code == 200 and [g.get("error", {}).get("status") for g in got] == [
        None,
        None,
        413,
    ]
    assert got[2]["error"]["message"] == (
        "image is 80x80 = 6,400 pixels; with the request's other images that is over the "
        "limit of 15,000 pixels in all"
    )


def test_host_check_when_bound_to_loopback(stub_app):
    with TestClient(stub_app(host="127.0.0.1")) as c:
        # another port is a tunnel or a local proxy (ssh -L 9000:localhost:8000): allowed
        for good in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost", "[::1]:9000"):
            assert c.get("/healthz", headers={"host": good}).status_code == 200, good
        for bad in ("evil.example:8000", "evil.example", "localhost:x", "[::1]x", ""):
            r = c.get("/healthz", headers={"host": bad})
            assert r.status_code == 421 and r.json()["error"]["status"] == 421, bad
    with TestClient(stub_app(host="0.0.0.0")) as c:  # bound to the network: any Host
        assert c.get("/healthz", headers={"host": "server.example"}).status_code == 200


def test_security_headers_head_docs_and_favicon(client):
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'sha256-" in csp
    assert "unsafe-inline" not in csp
    for r in (page, client.get("/healthz"), client.get("/nowhere")):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    head = client.head("/")
    assert head.status_code == 200 and head.content == b""
    assert client.get("/openapi.json").status_code == 200
    docs = client.get("/docs")
    if not HAS_OFFLINE_DOCS:  # no Swagger UI files here: /docs is off, never a CDN page
        assert docs.status_code == 404
        return
    assert docs.status_code == 200 and "docs/static/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower() and "http" not in docs.text.split("<body>")[1]
    assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 200


class ExplainingStub(StubPredictor):
    def __init__(self, path, backend="auto", reject=True):
        super().__init__(path, backend, reject)
        self.can_explain = True

    def explain_png(self, image):
        return "bright", "data:image/png;base64,"


def test_explain_refuses_more_than_one_file(monkeypatch):
    monkeypatch.setattr(serve, "Predictor", ExplainingStub)
    with TestClient(serve.create_app("stub", max_pixels=10_000)) as c:
        r = c.post("/v1/explain", files=files(("a.png", png()), ("b.png", png())))
        assert error_of(r) == (
            422,
            {"status": 422, "message": "explain takes one image; this request has 2 files"},
        )
        r = c.post("/v1/explain", files=files(("a.png", png())))
        assert r.status_code == 200 and r.json()["label"] == "bright"
        status, error = error_of(c.post("/v1/explain", files=files(("a.txt", b"text"))))
        assert status == 415 and error["message"] == uploads.NOT_AN_IMAGE


def test_favicon_is_served(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert 'href="favicon.ico"' in client.get("/").text


def test_headers_that_never_finish_lose_their_connection(stub_app):
    with live(stub_app(), http=serve.header_timeout_protocol(0.5)) as (host, port):
        with socket.create_connection((host, port), 5) as sock:  # a complete request first
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock)[0] == 200
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.")  # then headers that stall
            t0 = time.monotonic()
            assert sock.recv(100) == b""  # closed by the server (else the 5 s timeout raises)
            assert time.monotonic() - t0 < 3
        with socket.create_connection((host, port), 5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            assert sock.recv(100) == b""
