"""``cnnkit serve``: a REST API and a web page for a run or an exported ONNX file.

Endpoints: ``POST /v1/predict`` (multipart files or a raw image body), ``POST /v1/explain``
(Grad-CAM, when serving a run), ``GET /v1/model``, ``GET /healthz``, ``GET /metrics``
(Prometheus text), ``GET /docs`` (OpenAPI) and ``GET /`` (the page).

Requests that arrive together are batched: what queued up while the previous batch ran
goes into the next one, topped up for at most ``max_wait_ms`` when several arrive at once
(a lone request never waits); up to ``max_batch`` images run as one batch in a worker
thread, so the event loop keeps accepting requests.

Inputs are checked before they are decoded in full: bodies over ``max_upload_bytes`` and
images over ``max_pixels`` get 413, non-images 415, truncated or corrupt images 422; each
file of a batch gets its own result.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request  # this module is imported only to serve
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from cnnkit.data.decode import (
    EmptyImageError,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    open_image,
    to_input_tensor,
)
from cnnkit.evaluate.explain import explain_images
from cnnkit.runs.inference import top_k
from cnnkit.runs.run import load_run

from .onnx_model import OnnxModel

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000  # about a 7,300 x 5,500 photo
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MULTIPART_FRAMING_BYTES = 64 * 1024  # allowed on top of max_upload_bytes in Content-Length
NOT_AN_IMAGE = (
    "not an image, or a format that cannot be read (use JPEG, PNG, WebP, BMP, GIF or TIFF)"
)
EXPLAIN_NEEDS_TORCH = "Grad-CAM needs the PyTorch model: serve the run directory, not the ONNX file"


class InputError(Exception):
    """An upload that cannot be used; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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
            report = self.path.with_suffix(".json")
        else:
            run = self.model
            info["provenance"] = {
                "model": run.config.model.name,
                "data": run.config.data.name,
                **(run.checkpoint_info or {}),
            }
            report = run.path / "eval-test.json"
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
    """Collects concurrent single-image requests into batches for one worker thread."""

    def __init__(self, fn, max_batch: int = 32, max_wait_ms: float = 5.0):
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnkit-infer")
        self.task: asyncio.Task | None = None
        self.batch_sizes: dict[int, int] = defaultdict(int)

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
            self.batch_sizes[len(items)] += 1
            try:
                probs = await loop.run_in_executor(
                    self.executor, self.fn, torch.stack([image for image, _ in items])
                )
                for (_, future), row in zip(items, probs, strict=True):
                    if not future.done():
                        future.set_result(row)
            except Exception as e:  # a model failure fails these requests, not the server
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)


class Metrics:
    """Counters and a latency histogram, rendered in Prometheus text format."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.errors: dict[int, int] = defaultdict(int)
        self.images = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] += 1
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency[i] += 1
                break
        else:
            self.latency[-1] += 1

    def render(self, batch_sizes: dict[int, int]) -> str:
        lines = [
            "# HELP cnnkit_requests_total HTTP requests by path and status.",
            "# TYPE cnnkit_requests_total counter",
        ]
        lines += [
            f'cnnkit_requests_total{{path="{p}",status="{s}"}} {n}'
            for (p, s), n in sorted(self.requests.items())
        ]
        lines += [
            "# HELP cnnkit_images_total Images classified.",
            "# TYPE cnnkit_images_total counter",
            f"cnnkit_images_total {self.images}",
            "# HELP cnnkit_input_errors_total Rejected inputs by HTTP status.",
            "# TYPE cnnkit_input_errors_total counter",
        ]
        lines += [
            f'cnnkit_input_errors_total{{status="{s}"}} {n}' for s, n in sorted(self.errors.items())
        ]
        lines += [
            "# HELP cnnkit_request_latency_seconds Request latency.",
            "# TYPE cnnkit_request_latency_seconds histogram",
        ]
        cumulative = 0
        for bound, n in zip(LATENCY_BUCKETS, self.latency, strict=False):
            cumulative += n
            lines.append(f'cnnkit_request_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
        total = sum(self.latency)
        lines += [
            f'cnnkit_request_latency_seconds_bucket{{le="+Inf"}} {total}',
            f"cnnkit_request_latency_seconds_sum {self.latency_sum:.6f}",
            f"cnnkit_request_latency_seconds_count {total}",
            "# HELP cnnkit_batch_size_total Inference batches by size.",
            "# TYPE cnnkit_batch_size_total counter",
        ]
        lines += [
            f'cnnkit_batch_size_total{{size="{k}"}} {v}' for k, v in sorted(batch_sizes.items())
        ]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- reading the request


async def read_uploads(
    request: Request, max_upload_bytes: int
) -> list[tuple[str | None, bytes | InputError]]:
    """(name, bytes or the error) for each uploaded file: multipart files, or the raw body.

    A request over the limit as a whole raises InputError; in a form, each file over the
    limit gets its own error and the others are still read.
    """
    length = request.headers.get("content-length")
    if length and int(length) > max_upload_bytes + MULTIPART_FRAMING_BYTES:
        raise InputError(413, f"upload of {int(length):,} bytes; the limit is {max_upload_bytes:,}")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _read_form_files(request, max_upload_bytes)
    return [("body", await _read_body(request, max_upload_bytes))]


async def _read_form_files(
    request: Request, max_upload_bytes: int
) -> list[tuple[str | None, bytes | InputError]]:
    form = await request.form(max_files=256)
    files = [v for _, v in form.multi_items() if hasattr(v, "read")]
    if not files:
        raise InputError(422, "no files in the form: send them as 'files'")
    out: list[tuple[str | None, bytes | InputError]] = []
    for f in files:
        data = await f.read(max_upload_bytes + 1)  # one byte more tells it is over the limit
        if len(data) > max_upload_bytes:
            too_large = InputError(413, f"file larger than the limit of {max_upload_bytes:,} bytes")
            out.append((f.filename, too_large))
        else:
            out.append((f.filename or "upload", data))
    return out


async def _read_body(request: Request, max_upload_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():  # stop reading as soon as it is over the limit
        body += chunk
        if len(body) > max_upload_bytes:
            raise InputError(413, f"body larger than the limit of {max_upload_bytes:,} bytes")
    if not body:
        raise InputError(422, "empty body: send an image as the body or as multipart 'files'")
    return bytes(body)


def decode_upload(data: bytes, preprocessing: dict, max_pixels: int) -> torch.Tensor:
    """Bytes -> the model's uint8 input, checking the size before decoding the pixels."""
    try:
        im = open_image(data, max_pixels=max_pixels)
    except ImageReadError as e:
        raise upload_error(e) from None
    try:
        return to_input_tensor(im, preprocessing)
    except (OSError, SyntaxError, ValueError) as e:  # a mode Pillow cannot convert
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
            413, f"image is {w}x{h} = {w * h:,} pixels; the limit is {e.max_pixels:,}"
        )
    return InputError(422, f"truncated or corrupt image ({e.reason})")


# ---------------------------------------------------------------- what the endpoints do


def error_json(status: int, message: str) -> JSONResponse:
    """The API's error shape: ``{"error": {"status", "message"}}``."""
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def page_html(classes: list[str]) -> str:
    """The web page, titled with the number of classes."""
    page = Path(__file__).with_name("page.html").read_text()
    return page.replace("__TITLE__", f"cnnkit: {len(classes)} classes")


def _top_k_rows(probs: list[np.ndarray], classes: list[str], k: int) -> list[dict]:
    """{"label", "top": [{"class", "probability"}, ...]} for each row, most probable first."""
    return [
        {"label": top[0][0], "top": [{"class": c, "probability": p} for c, p in top]}
        for top in top_k(np.stack(probs), classes, k)
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
    ):
        self.predictor, self.batcher, self.metrics = predictor, batcher, metrics
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels

    def reject(self, e: InputError) -> JSONResponse:
        """The error response for a whole request, counted."""
        self.metrics.errors[e.status] += 1
        return error_json(e.status, e.message)

    def decode(self, data: bytes | InputError) -> torch.Tensor:
        """One upload -> the model's input; raises InputError (also one met while reading)."""
        if isinstance(data, InputError):
            raise data
        return decode_upload(data, self.predictor.preprocessing, self.max_pixels)

    async def predict(self, request: Request, k: int) -> JSONResponse:
        """One result per file, in order; 200 when any was classified, else the first error."""
        try:
            uploads = await read_uploads(request, self.max_upload_bytes)
        except InputError as e:
            return self.reject(e)
        results: list[dict] = []
        ready: list[tuple[int, torch.Tensor]] = []  # (position in results, input)
        for name, data in uploads:
            try:
                ready.append((len(results), self.decode(data)))
                results.append({"file": name})
            except InputError as e:
                self.metrics.errors[e.status] += 1
                results.append({"file": name, "error": {"status": e.status, "message": e.message}})
        if ready:
            probs = await self.batcher.submit([t for _, t in ready])
            self.metrics.images += len(ready)
            rows = _top_k_rows(probs, self.predictor.classes, k)
            for (i, _), row in zip(ready, rows, strict=True):
                results[i].update(row)
        status = 200 if ready else results[0]["error"]["status"]
        return JSONResponse({"predictions": results}, status_code=status)

    async def explain(self, request: Request) -> dict | JSONResponse:
        """The predicted class and its Grad-CAM overlay for the first uploaded image."""
        if not self.predictor.can_explain:
            return error_json(501, EXPLAIN_NEEDS_TORCH)  # an answer, not an input error
        try:
            name, data = (await read_uploads(request, self.max_upload_bytes))[0]
            image = self.decode(data)
        except InputError as e:
            return self.reject(e)
        loop = asyncio.get_running_loop()
        # on the batcher's thread: the model is never run from two threads at once
        label, uri = await loop.run_in_executor(
            self.batcher.executor, self.predictor.explain_png, image
        )
        return {"file": name, "label": label, "overlay": uri}


# ---------------------------------------------------------------- the app


def create_app(
    model_path: str | Path,
    *,
    backend: str = "auto",
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    top_k: int = 5,
) -> FastAPI:
    """The FastAPI app serving the run or ONNX file at ``model_path``."""
    predictor = Predictor(model_path, backend)
    batcher = MicroBatcher(predictor.probabilities, max_batch, max_wait_ms)
    metrics = Metrics()
    service = Service(predictor, batcher, metrics, max_upload_bytes, max_pixels)
    html = page_html(predictor.classes)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="cnnkit",
        version="1",
        lifespan=lifespan,
        description=f"Image classifier: {', '.join(predictor.classes[:20])}",
    )
    app.state.predictor, app.state.batcher, app.state.metrics = predictor, batcher, metrics

    @app.middleware("http")
    async def measure(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        metrics.observe(request.url.path, response.status_code, time.perf_counter() - t0)
        return response

    # Route functions carry no return annotation: FastAPI would take it for a response model.
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return html

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info():
        return predictor.describe()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return metrics.render(batcher.batch_sizes)

    @app.post("/v1/predict")
    async def predict(request: Request, k: int = top_k):
        """Classify one or more images: multipart field 'files', or an image as the body."""
        return await service.predict(request, k)

    @app.post("/v1/explain")
    async def explain(request: Request):
        """Grad-CAM overlay (PNG data URI) for the predicted class of one image."""
        return await service.explain(request)

    return app


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    import uvicorn

    uvicorn.run(create_app(model_path, **kwargs), host=host, port=port, log_level="info")
