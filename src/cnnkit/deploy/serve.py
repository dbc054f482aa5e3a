"""``cnnkit serve``: a REST API and a web page for a run or an exported ONNX file.

Endpoints: ``POST /v1/predict`` (multipart files or a raw image body), ``POST /v1/explain``
(Grad-CAM of one image, when serving a run), ``GET /v1/model``, ``GET /healthz``,
``GET /metrics`` (Prometheus text, from prometheus_client), ``GET /docs`` (Swagger UI, served
from this machine), ``GET /openapi.json`` and ``GET /`` (the page).

Requests that arrive together are batched: what queued up while the previous batch ran
goes into the next one, topped up for at most ``max_wait_ms`` when several arrive at once
(a lone request never waits); up to ``max_batch`` images run as one batch in a worker
thread, so the event loop keeps accepting requests.

Inputs are checked before they are decoded in full, and decoded in a small pool of threads,
never on the event loop: bodies over ``max_upload_bytes`` get 413 as soon as the bytes
read pass the limit, whatever the framing (Content-Length or chunked); a body that does not
arrive within ``upload_timeout_s`` gets 408; images over ``max_pixels``, or that would take
a request past ``max_request_pixels`` in all, get 413; non-images 415; truncated or corrupt
images 422. Each file of a batch gets its own result. Every error is JSON:
``{"error": {"status", "message"}}`` for a whole request, the same pair under each file's
``"error"`` in ``{"predictions": [...]}``.

Bound to a loopback address, the service answers only requests whose Host is that machine
(``localhost``, ``127.0.0.1`` or ``[::1]``): a web page elsewhere cannot reach it through
DNS rebinding.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import io
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request  # this module is imported only to serve
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as prometheus_text
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnkit.data.decode import (
    EmptyImageError,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    open_image,
    to_input_tensor,
)
from cnnkit.evaluate.explain import explain_images
from cnnkit.runs.inference import top_k as top_k_classes
from cnnkit.runs.run import load_run

from .onnx_model import OnnxModel

log = logging.getLogger("cnnkit.serve")

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000  # about a 7,300 x 5,500 photo
MAX_REQUEST_PIXELS = 100_000_000  # all the images of one request together
DECODE_THREADS = min(4, os.cpu_count() or 1)  # images decoded at once, across all requests
UPLOAD_TIMEOUT_S = 30.0  # for the whole body: a client that trickles it is cut off
HEADER_TIMEOUT_S = 10.0  # for the request line and headers, from connecting or the last answer
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MULTIPART_FRAMING_BYTES = 64 * 1024  # allowed on top of max_upload_bytes in a form
UNMATCHED_PATH = "(unmatched)"  # the one metrics label of every path no route serves
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")
NOT_AN_IMAGE = (
    "not an image, or a format that cannot be read (use JPEG, PNG, WebP, BMP, GIF or TIFF)"
)
EXPLAIN_NEEDS_TORCH = "Grad-CAM needs the PyTorch model: serve the run directory, not the ONNX file"
# Swagger UI's files come from the fastapi-offline package when it is installed: /docs then
# works with no network. Without it /docs is off (a page that loads its JS from a CDN would
# not work offline and would leak who reads the docs); /openapi.json is always served.
SWAGGER_STATIC = "fastapi_offline"
# The page's icon (browsers ask for /favicon.ico): a grid of pixels, a little classifier.
FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="3" fill="#4c9be8"/>'
    '<path d="M4 4h3v3H4zm5 0h3v3H9zM4 9h3v3H4z" fill="#fff"/></svg>'
)
# Responses other than the page and /docs: nothing to run, and not to be framed.
NONE = "'none'"
API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; frame-ancestors 'none'"
)


class InputError(Exception):
    """An upload that cannot be used; ``status`` is the HTTP status to answer with.

    ``size``: (width, height) of an image refused for its pixels, from its header.
    """

    def __init__(self, status: int, message: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.status, self.message, self.size = status, message, size


# ---------------------------------------------------------------- the model behind the API


class Predictor:
    """What the service needs of a model, for a run (PyTorch) or an ONNX file."""

    def __init__(self, path: str | Path, backend: str = "auto"):
        path = Path(path)
        if backend == "auto":
            backend = "onnx" if path.suffix == ".onnx" else "torch"
        if backend == "onnx" and path.is_dir():
            path = path / "model.onnx"
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: run 'cnnkit export' first")
        if backend == "torch" and path.suffix == ".onnx":
            raise ValueError("an ONNX file runs on the onnx backend")
        self.backend, self.path = backend, path
        if backend == "onnx":
            # No busy-waiting worker threads: they would take the CPU from the HTTP server.
            self.model = OnnxModel(path, spinning=False)
        else:
            self.model = load_run(path)
        self.classes: list[str] = self.model.classes
        self.preprocessing: dict = self.model.preprocessing
        self.can_explain = backend == "torch"

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        p = self.model.probabilities(images)
        return p.cpu().numpy() if isinstance(p, torch.Tensor) else p

    def describe(self) -> dict:
        info = {
            "backend": self.backend,
            "path": str(self.path),
            "classes": self.classes,
            "input": self.preprocessing,
            "explain": self.can_explain,
        }
        if self.backend == "onnx":
            info["provenance"] = self.model.provenance
            info["val_accuracy"] = None  # the ONNX file does not record it
            report = self.path.with_suffix(".json")
        else:
            run = self.model
            info["provenance"] = {
                "model": run.config.model.name,
                "data": run.config.data.name,
                **(run.checkpoint_info or {}),
                "checkpoint": run.checkpoint_ref,
            }
            info["val_accuracy"] = run.val_accuracy
            report = run.path / f"eval-{run.choose_split().split}.json"
            # metrics of other weights (a resumed run's old evaluation) are not these weights'
            if report.name in {s.files[0].name for s in run.stale_outputs()}:
                info["metrics_stale"] = f"{report.name} is from other weights: cnnkit evaluate"
                report = run.path / "no such file"
        if report.exists():
            d = json.loads(report.read_text())
            info["metrics"] = {
                k: d[k] for k in ("split", "accuracy", "macro_avg", "parity", "int8") if k in d
            }
        return info

    def explain_png(self, image: torch.Tensor) -> tuple[str, str]:
        """(predicted class, PNG data URI of the Grad-CAM overlay) for one uint8 image."""
        run = self.model
        overlays, logits = explain_images(run.model, run.normalizer, image[None].to(run.device))
        buf = io.BytesIO()
        overlays[0].resize((224, 224)).save(buf, format="PNG")
        label = self.classes[int(logits.argmax(1))]
        return label, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class MicroBatcher:
    """Collects concurrent single-image requests into batches for one worker thread.

    ``on_batch`` is told the size of each batch (the metrics count them).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], np.ndarray],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnkit-infer")
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=False)

    async def submit(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures, strict=True):
            await self.queue.put((image, future))
        return list(await asyncio.gather(*futures))

    def _run(self, images: list[torch.Tensor]) -> np.ndarray:
        return self.fn(torch.stack(images))  # stacking is a copy: off the event loop too

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            # Take what queued up while the last batch ran. Wait for more only when requests
            # are evidently arriving together: a lone request is never delayed.
            while len(items) < self.max_batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            deadline = loop.time() + self.max_wait
            while 1 < len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            if self.on_batch:
                self.on_batch(len(items))
            try:
                probs = await loop.run_in_executor(
                    self.executor, self._run, [image for image, _ in items]
                )
                for (_, future), row in zip(items, probs, strict=True):
                    if not future.done():
                        future.set_result(row)
            except Exception as e:  # a model failure fails these requests, not the server
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app).

    Requests are labelled by route template, never by the raw path: a client cannot make
    the page grow by asking for paths that do not exist, nor break it with what it puts in one.
    """

    def __init__(self, max_batch: int = 32):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cnnkit_requests",
            "HTTP requests by route template and status.",
            ["path", "status"],
            registry=self.registry,
        )
        self.images = Counter("cnnkit_images", "Images classified.", registry=self.registry)
        self.input_errors = Counter(
            "cnnkit_input_errors",
            "Rejected inputs (whole requests or single files) by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cnnkit_request_latency_seconds",
            "Request latency.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        sizes = [2**i for i in range(max(1, max_batch).bit_length() + 1)]
        self.batch_size = Histogram(
            "cnnkit_batch_size",
            "Images per inference batch.",
            buckets=sizes,
            registry=self.registry,
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path=path, status=str(status)).inc()
        self.latency.observe(seconds)

    def input_error(self, status: int) -> None:
        self.input_errors.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return prometheus_text(self.registry)


# ---------------------------------------------------------------- reading the request


def bounded_receive(
    receive: Receive, max_bytes: int, timeout_s: float, too_large: str | None = None
) -> Receive:
    """``receive`` that raises InputError once more than ``max_bytes`` of body have come in
    (413, with the message ``too_large``), or when the body has not all come within
    ``timeout_s`` (408).

    It counts what actually arrives, so neither a chunked body nor a Content-Length that
    lies gets past the limit, and a client that trickles its upload is cut off.
    """
    received = 0
    deadline = time.monotonic() + timeout_s
    too_large = too_large or f"body larger than the limit of {max_bytes:,} bytes"

    async def receive_within_limits() -> Message:
        nonlocal received
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise InputError(
                408, f"upload too slow: the body did not arrive within {timeout_s:g} s"
            ) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise InputError(413, too_large)
        return message

    return receive_within_limits


async def read_uploads(
    request: Request, max_upload_bytes: int, timeout_s: float = UPLOAD_TIMEOUT_S
) -> list[tuple[str | None, bytes | InputError]]:
    """(name, bytes or the error) for each uploaded file: multipart files, or the raw body.

    A request over the limit as a whole raises InputError; in a form, each file over the
    limit gets its own error and the others are still read.
    """
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_upload_bytes + MULTIPART_FRAMING_BYTES:
        raise InputError(413, f"upload of {int(length):,} bytes; the limit is {max_upload_bytes:,}")
    is_form = request.headers.get("content-type", "").startswith("multipart/form-data")
    # A form may carry its framing on top of the files' bytes; a raw body is the file itself.
    max_body, too_large = max_upload_bytes, None
    if is_form:
        max_body += MULTIPART_FRAMING_BYTES
        too_large = (
            f"form larger than the limit of {max_upload_bytes:,} bytes "
            f"(and {MULTIPART_FRAMING_BYTES:,} bytes of form framing)"
        )
    receive = bounded_receive(request.receive, max_body, timeout_s, too_large)
    request = Request(request.scope, receive)
    try:
        if is_form:
            return await _read_form_files(request, max_upload_bytes)
        return [("body", await _read_body(request))]
    except ClientDisconnect:
        raise InputError(400, "the client went away before the upload was complete") from None


async def _read_form_files(
    request: Request, max_upload_bytes: int
) -> list[tuple[str | None, bytes | InputError]]:
    form = await request.form(max_files=256)
    try:  # the spooled temporary files close here, not when garbage-collected
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise InputError(422, "no files in the form: send them as 'files'")
        out: list[tuple[str | None, bytes | InputError]] = []
        for f in files:
            data = await f.read(max_upload_bytes + 1)  # one byte more: over the limit
            if len(data) > max_upload_bytes:
                limit = f"file larger than the limit of {max_upload_bytes:,} bytes"
                out.append((f.filename or "upload", InputError(413, limit)))
            else:
                out.append((f.filename or "upload", data))
        return out
    finally:
        await form.close()


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():  # the bounded receive stops it at the limit
        body += chunk
    if not body:
        raise InputError(422, "empty body: send an image as the body or as multipart 'files'")
    return bytes(body)


def decode_upload(data: bytes, preprocessing: dict, max_pixels: int) -> tuple[torch.Tensor, int]:
    """Bytes -> (the model's uint8 input, the pixels decoded), checking the size first.

    CPU-heavy: run it in a worker thread, never on the event loop.
    """
    try:
        im = open_image(data, max_pixels=max_pixels)
    except ImageReadError as e:
        raise upload_error(e) from None
    except Exception as e:
        # A decoder plug-in that fails in a way open_image does not expect (DDS raises
        # NotImplementedError on unknown pixel formats): still this file's fault, not ours.
        log.warning("image decoder failed: %r", e)
        raise InputError(422, f"cannot decode image ({type(e).__name__}: {e})") from None
    pixels = im.size[0] * im.size[1]
    try:
        return to_input_tensor(im, preprocessing), pixels
    except Exception as e:  # a mode Pillow cannot convert, or a plug-in's own failure
        raise InputError(422, f"truncated or corrupt image ({e})") from None


def upload_error(e: ImageReadError) -> InputError:
    """The API's answer to an image that does not decode: its status by the kind of failure."""
    if isinstance(e, EmptyImageError):
        return InputError(422, "empty file")
    if isinstance(e, NotAnImageError):
        return InputError(415, NOT_AN_IMAGE)
    if isinstance(e, ImageTooLargeError):
        if e.size is None:  # Pillow's own decompression-bomb limit
            return InputError(413, f"image too large: {e.reason}")
        w, h = e.size
        return InputError(
            413, f"image is {w}x{h} = {w * h:,} pixels; the limit is {e.max_pixels:,}", e.size
        )
    return InputError(422, f"truncated or corrupt image ({e.reason})")


def check_k(k: int | None, default: int, classes: int) -> int:
    """The ``k`` query parameter, the number of classes to list: 1 to ``classes``.

    Left out, it is ``default`` capped at the number of classes.
    """
    if k is None:
        return min(default, classes)
    if not 1 <= k <= classes:
        raise InputError(422, f"k must be from 1 to {classes} (the number of classes); got {k}")
    return k


# ---------------------------------------------------------------- what the endpoints do


def error_json(status: int, message: str) -> JSONResponse:
    """The API's error shape: ``{"error": {"status", "message"}}``."""
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def _hash_source(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def page_html(classes: list[str]) -> tuple[str, str]:
    """The web page, titled with the number of classes, and its Content-Security-Policy.

    The policy allows the page's own inline script and style by their hashes, and nothing
    else: no other script, no framing by other sites.
    """
    page = Path(__file__).with_name("page.html").read_text()
    page = page.replace("__TITLE__", f"cnnkit: {len(classes)} classes")
    scripts = " ".join(map(_hash_source, re.findall(r"<script>(.*?)</script>", page, re.S)))
    styles = " ".join(map(_hash_source, re.findall(r"<style>(.*?)</style>", page, re.S)))
    csp = (
        f"default-src 'none'; script-src {scripts or NONE}; style-src {styles or NONE}; "
        "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, csp


def _top_k_rows(probs: list[np.ndarray], classes: list[str], k: int) -> list[dict]:
    """{"label", "top": [{"class", "probability"}, ...]} for each row, most probable first."""
    return [
        {"label": top[0][0], "top": [{"class": c, "probability": p} for c, p in top]}
        for top in top_k_classes(np.stack(probs), classes, k)
    ]


class Service:
    """The predict and explain endpoints over one model, its batcher, metrics and limits."""

    def __init__(
        self,
        predictor: Predictor,
        batcher: MicroBatcher,
        metrics: Metrics,
        max_upload_bytes: int,
        max_pixels: int,
        *,
        max_request_pixels: int = MAX_REQUEST_PIXELS,
        decode_threads: int = DECODE_THREADS,
        upload_timeout_s: float = UPLOAD_TIMEOUT_S,
        default_k: int = 5,
    ):
        self.predictor, self.batcher, self.metrics = predictor, batcher, metrics
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.max_request_pixels, self.upload_timeout_s = max_request_pixels, upload_timeout_s
        self.default_k = default_k
        # At most decode_threads images are decoded at once, by all requests together.
        self.decoder = ThreadPoolExecutor(decode_threads, thread_name_prefix="cnnkit-decode")

    def reject(self, e: InputError) -> JSONResponse:
        """The error response for a whole request, counted."""
        self.metrics.input_error(e.status)
        return error_json(e.status, e.message)

    async def read(self, request: Request) -> list[tuple[str | None, bytes | InputError]]:
        return await read_uploads(request, self.max_upload_bytes, self.upload_timeout_s)

    async def decode_all(
        self, uploads: list[tuple[str | None, bytes | InputError]]
    ) -> list[torch.Tensor | InputError]:
        """Each upload decoded in the decode pool, one after the other, within the request's
        pixel budget: the input, or the InputError that refused it (counted)."""
        loop = asyncio.get_running_loop()
        budget = self.max_request_pixels
        out: list[torch.Tensor | InputError] = []
        for _, data in uploads:
            if isinstance(data, InputError):
                out.append(data)
                self.metrics.input_error(data.status)
                continue
            if budget <= 0:
                limit_error = InputError(
                    413, f"the request's images exceed {self.max_request_pixels:,} pixels in all"
                )
                out.append(limit_error)
                self.metrics.input_error(413)
                continue
            limit = min(self.max_pixels, budget)
            pre = self.predictor.preprocessing
            try:
                tensor, pixels = await loop.run_in_executor(
                    self.decoder, decode_upload, data, pre, limit
                )
            except InputError as e:
                if e.size is not None and e.size[0] * e.size[1] <= self.max_pixels:
                    w, h = e.size  # within the limit for one image, not within the budget
                    e = InputError(
                        413,
                        f"image is {w}x{h} = {w * h:,} pixels; with the request's other images "
                        f"that is over the limit of {self.max_request_pixels:,} pixels in all",
                        e.size,
                    )
                out.append(e)
                self.metrics.input_error(e.status)
                continue
            budget -= pixels
            out.append(tensor)
        return out

    async def predict(self, request: Request, k: int | None = None) -> JSONResponse:
        """One result per file, in order; 200 when any was classified, else the first error."""
        try:
            k = check_k(k, self.default_k, len(self.predictor.classes))
            uploads = await self.read(request)
        except InputError as e:
            return self.reject(e)
        decoded = await self.decode_all(uploads)
        results: list[dict] = []
        ready: list[tuple[int, torch.Tensor]] = []  # (position in results, input)
        for (name, _), item in zip(uploads, decoded, strict=True):
            if isinstance(item, InputError):
                error = {"status": item.status, "message": item.message}
                results.append({"file": name, "error": error})
            else:
                ready.append((len(results), item))
                results.append({"file": name})
        if ready:
            probs = await self.batcher.submit([t for _, t in ready])
            self.metrics.images.inc(len(ready))
            rows = _top_k_rows(probs, self.predictor.classes, k)
            for (i, _), row in zip(ready, rows, strict=True):
                results[i].update(row)
        status = 200 if ready else results[0]["error"]["status"]
        return JSONResponse({"predictions": results}, status_code=status)

    async def explain(self, request: Request) -> dict | JSONResponse:
        """The predicted class and its Grad-CAM overlay for one uploaded image."""
        if not self.predictor.can_explain:
            return error_json(501, EXPLAIN_NEEDS_TORCH)  # an answer, not an input error
        try:
            uploads = await self.read(request)
            if len(uploads) > 1:
                raise InputError(
                    422, f"explain takes one image; this request has {len(uploads)} files"
                )
            [(name, data)] = uploads
            [image] = await self.decode_all([(name, data)])
        except InputError as e:
            return self.reject(e)
        if isinstance(image, InputError):  # counted by decode_all
            return error_json(image.status, image.message)
        loop = asyncio.get_running_loop()
        # on the batcher's thread: the model is never run from two threads at once
        label, uri = await loop.run_in_executor(
            self.batcher.executor, self.predictor.explain_png, image
        )
        return {"file": name, "label": label, "overlay": uri}

    def close(self) -> None:
        self.decoder.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- around every request


def is_loopback(host: str | None) -> bool:
    """Whether the server is bound to this machine only."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(value: str, port: int | None) -> bool:
    """Whether a Host header names this machine (any port: see below)."""
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name += "]"
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    else:
        name, sep, port_text = value.partition(":")
        port_text = port_text if sep else None
    # The name is what DNS rebinding changes; the port is not checked, since an SSH tunnel
    # or a local proxy forwards from another one (Host: localhost:9000 for a server on 8000).
    del port
    return name.lower() in LOOPBACK_HOST_NAMES and (port_text is None or port_text.isdigit())


def route_template(app: ASGIApp, scope: Scope) -> str:
    """The path template of the route that serves ``scope`` (``UNMATCHED_PATH`` if none)."""
    routes = getattr(getattr(app, "router", None), "routes", [])
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route.path
        if match == Match.PARTIAL and partial is None:  # the path, but not the method
            partial = route.path
    return partial or UNMATCHED_PATH


class GuardMiddleware:
    """Around every HTTP request: the Host check, security headers, metrics, and a JSON 500.

    A plain ASGI middleware (not ``@app.middleware``): an exception from an endpoint passes
    through it, so a failure is counted and answered as JSON like any other status.
    """

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, check_host: bool, port: int | None = None
    ):
        self.app, self.metrics, self.check_host, self.port = app, metrics, check_host, port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Content-Security-Policy", API_CSP)
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
            await send(message)

        try:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if self.check_host and not host_allowed(host, self.port):
                # DNS rebinding: a page from elsewhere resolving its own name to 127.0.0.1.
                response = error_json(
                    421, f"this server answers only for {', '.join(LOOPBACK_HOST_NAMES)}"
                )
                await response(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("request to %s failed", scope.get("path"))
            status = 500
            if started:
                raise  # too late for an error page: the server closes the connection
            await error_json(500, "internal server error")(scope, receive, send_with_headers)
        finally:
            self.metrics.observe(
                route_template(scope.get("app"), scope), status, time.perf_counter() - t0
            )


def _validation_message(exc: RequestValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
        for e in exc.errors()
    )


def _docs_static_dir() -> Path | None:
    """Swagger UI's files as installed with fastapi-offline, or None."""
    spec = importlib.util.find_spec(SWAGGER_STATIC)
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "swagger-ui-bundle.js").exists() else None


# ---------------------------------------------------------------- the app


def create_app(
    model_path: str | Path,
    *,
    backend: str = "auto",
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_request_pixels: int = MAX_REQUEST_PIXELS,
    decode_threads: int = DECODE_THREADS,
    upload_timeout_s: float = UPLOAD_TIMEOUT_S,
    top_k: int = 5,
    host: str | None = None,
    port: int | None = None,
) -> FastAPI:
    """The FastAPI app serving the run or ONNX file at ``model_path``.

    ``host`` and ``port``: where the server is bound. Bound to a loopback address, the app
    answers 421 to requests whose Host header names another machine (DNS rebinding).
    """
    predictor = Predictor(model_path, backend)
    metrics = Metrics(max_batch)
    batcher = MicroBatcher(
        predictor.probabilities, max_batch, max_wait_ms, on_batch=metrics.batch_size.observe
    )
    service = Service(
        predictor,
        batcher,
        metrics,
        max_upload_bytes,
        max_pixels,
        max_request_pixels=max_request_pixels,
        decode_threads=decode_threads,
        upload_timeout_s=upload_timeout_s,
        default_k=top_k,
    )
    html, page_csp = page_html(predictor.classes)
    docs_static = _docs_static_dir()

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        service.close()

    app = FastAPI(
        title="cnnkit",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # our own /docs below, with Swagger UI served from this machine
        redoc_url=None,
        description=f"Image classifier: {', '.join(predictor.classes[:20])}",
    )
    app.state.predictor, app.state.batcher, app.state.metrics = predictor, batcher, metrics
    app.add_middleware(GuardMiddleware, metrics=metrics, check_host=is_loopback(host), port=port)

    # Every error in the API's one shape, FastAPI's and Starlette's own included.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        response = error_json(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        metrics.input_error(422)
        return error_json(422, _validation_message(exc))

    # Route functions carry no return annotation: FastAPI would take it for a response model.
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return HTMLResponse(html, headers={"Content-Security-Policy": page_csp})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(FAVICON_SVG, media_type="image/svg+xml")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    # HEAD too, for probes that use it; one operation in the OpenAPI schema is enough.
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.get("/v1/model")
    async def model_info():
        # reads the run's files (its evaluations, their checkpoints): off the event loop
        return await asyncio.to_thread(predictor.describe)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict")
    async def predict(request: Request, k: int | None = None):
        """Classify one or more images: multipart field 'files', or an image as the body.

        ``k``: how many classes to list for each image, 1 to the number of classes.
        """
        return await service.predict(request, k)

    @app.post("/v1/explain")
    async def explain(request: Request):
        """Grad-CAM overlay (PNG data URI) for the predicted class of one image."""
        return await service.explain(request)

    if docs_static is not None:
        app.mount("/docs/static", StaticFiles(directory=docs_static), name="docs-static")

        @app.get("/docs", include_in_schema=False)
        async def docs():
            page = get_swagger_ui_html(
                openapi_url="openapi.json",  # relative: works behind a path prefix too
                title="cnnkit API",
                swagger_js_url="docs/static/swagger-ui-bundle.js",
                swagger_css_url="docs/static/swagger-ui.css",
                swagger_favicon_url="docs/static/favicon.png",
            )
            page.headers["Content-Security-Policy"] = DOCS_CSP
            return page

    return app


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's HTTP protocol, closing a connection whose request line and headers have not
    all arrived ``seconds`` after it opened or after its last response (slowloris).

    uvicorn times out idle keep-alive connections, and the app times out a slow body, but
    nothing in uvicorn bounds the wait for headers: a client sending them a byte at a time
    holds its connection for ever. Both of uvicorn's HTTP protocols set ``cycle`` when a
    request's headers are complete; that is what the timer looks at.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(seconds, self.headers_too_slow)

        def headers_too_slow(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request begun
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def serve(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    **kwargs,
) -> None:
    """Serve ``model_path`` with uvicorn; ``kwargs`` go to ``create_app``."""
    import uvicorn

    app = create_app(model_path, host=host, port=port, **kwargs)
    # Slow clients: idle keep-alive connections are closed after 5 s, headers that have not
    # arrived within header_timeout_s close the connection, and a body that trickles in is
    # answered 408 by the app (upload_timeout_s).
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_keep_alive=5,
        http=header_timeout_protocol(header_timeout_s),
    )
