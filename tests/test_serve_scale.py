"""cnnkit serve past one process: several workers behind one port, a SIGTERM that answers
every accepted request first, and 503 with Retry-After past capacity."""

import http.client
import io
import json
import signal
import socket
import threading
import time

import pytest
from PIL import Image

from cli_runs import cnnkit_cmd, kill_job, start_job

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digit_png() -> bytes:
    from cnnkit.data import load_dataset

    buf = io.BytesIO()
    Image.fromarray(load_dataset("mnist", val_split=0).test.images[0, 0].numpy()).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _request(port: int, method: str, path: str, body: bytes = b"", headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _wait_up(port: int, proc, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate(timeout=30)
        try:
            if _request(port, "GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


def test_two_workers_answer_and_sigterm_answers_every_accepted_request(tiny_run, tmp_path):
    """Two processes share the port. 16 requests are in flight when SIGTERM arrives (their
    headers and half of each body sent): the server keeps them, each gets its 200 once the
    rest of its body arrives, and then the server exits; a new request is not served."""
    port = _free_port()
    cmd = cnnkit_cmd("serve", tiny_run.path, "--port", str(port), "--workers", "2")
    proc = start_job(cmd, tmp_path)
    try:
        _wait_up(port, proc)
        workers, deadline = set(), time.monotonic() + 30
        for _ in range(300):  # new connections until both processes have answered
            workers.add(json.loads(_request(port, "GET", "/healthz")[2])["worker"])
            if len(workers) == 2 or time.monotonic() > deadline:
                break
        assert len(workers) == 2, workers

        png = _digit_png()
        half = len(png) // 2
        in_flight = []
        for _ in range(16):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.putrequest("POST", "/v1/predict")
            conn.putheader("Content-Type", "image/png")
            conn.putheader("Content-Length", str(len(png)))
            conn.endheaders(png[:half])
            in_flight.append(conn)
        time.sleep(0.5)  # every request has reached a worker
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the server is stopping: these are kept, a new one is not served
        # a new connection is refused, or left unanswered until the supervisor closes it
        with pytest.raises((ConnectionError, TimeoutError)):
            _request(port, "GET", "/healthz", timeout=2)
        answers = []
        for conn in in_flight:
            conn.send(png[half:])
            response = conn.getresponse()
            answers.append((response.status, json.loads(response.read())))
            conn.close()
        assert [status for status, _ in answers] == [200] * 16, answers
        labels = {body["predictions"][0]["label"] for _, body in answers}
        (tmp_path / "digit.png").write_bytes(png)
        assert labels == {tiny_run.predict(tmp_path / "digit.png")[0].label}
        proc.communicate(timeout=60)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            kill_job(proc)


def test_past_capacity_the_answer_is_503_with_retry_after(monkeypatch):
    """A batcher holding --max-queue images: the next request gets 503 at once, with
    Retry-After, in each API's error shape; the queued ones are answered."""
    from fastapi.testclient import TestClient

    from cnnkit.deploy import serve
    from cnnkit.deploy.v2 import model_name
    from test_serve import StubPredictor

    monkeypatch.setattr(serve, "Predictor", StubPredictor)
    app = serve.create_app("stub", max_wait_ms=1, max_queue=2)
    with TestClient(app) as client:
        batcher = app.state.batcher
        batcher.pending = 2  # as if two images were waiting
        buf = io.BytesIO()
        Image.new("L", (8, 8)).save(buf, format="PNG")
        start = time.monotonic()
        r = client.post(
            "/v1/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"}
        )
        assert time.monotonic() - start < 1.0
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["status"] == 503 and "capacity" in r.json()["error"]["message"]
        name = model_name(app.state.predictor)
        v2 = client.post(f"/v2/models/{name}/infer", json={"inputs": []})
        assert v2.status_code == 503 and "capacity" in v2.json()["error"]
        batcher.pending = 0
        ok = client.post(
            "/v1/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"}
        )
        assert ok.status_code == 200


def test_the_capacity_bound_counts_images_in_flight():
    """MicroBatcher.pending rises with submitted images and falls as they are answered."""
    import asyncio

    import numpy as np
    import torch

    from cnnkit.deploy.serve import MicroBatcher, Overloaded

    release = threading.Event()

    def slow(images):
        release.wait(10)
        return np.zeros((len(images), 2), np.float32)

    async def scenario():
        batcher = MicroBatcher(slow, max_batch=4, max_wait_ms=1, max_queue=3)
        await batcher.start()
        image = torch.zeros((1, 8, 8), dtype=torch.uint8)
        first = asyncio.create_task(batcher.submit([image, image, image]))
        await asyncio.sleep(0.05)
        assert batcher.pending == 3
        with pytest.raises(Overloaded):
            await batcher.submit([image])
        release.set()
        assert len(await first) == 3
        assert batcher.pending == 0
        assert len(await batcher.submit([image])) == 1
        await batcher.stop()

    # in a thread of its own: an earlier test (playwright's sync API) may have left an event
    # loop running in this one, where asyncio.run refuses to start
    failures = []
    thread = threading.Thread(target=lambda: _run_catching(scenario, failures))
    thread.start()
    thread.join(60)
    assert not thread.is_alive() and not failures, failures


def _run_catching(scenario, failures: list) -> None:
    import asyncio

    try:
        asyncio.run(scenario())
    except BaseException as e:  # reported by the test's own thread
        failures.append(repr(e))
