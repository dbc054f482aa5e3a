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

from cnnkit.data.decode import to_input_tensor

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000  # about a 7,300 x 5,500 photo
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class InputError(Exception):
    """An upload that cannot be used; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------- the model behind the API


class Predictor:
    """What the service needs of a model, for a run (PyTorch) or an ONNX file."""

    def __init__(self, path: str | Path, backend: str = "auto"):
        import cnnkit

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
            from cnnkit.deploy.onnx_model import OnnxModel

            # No busy-waiting worker threads: they would take the CPU from the HTTP server.
            self.model = OnnxModel(path, spinning=False)
        else:
            self.model = cnnkit.load_run(path)
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
        from cnnkit.evaluate.explain import GradCAM, overlay

        run = self.model
        x = image[None].to(run.device)
        heat, logits = GradCAM(run.model)(run.normalizer(x))
        buf = io.BytesIO()
        overlay(x[0], heat[0]).resize((224, 224)).save(buf, format="PNG")
        label = self.classes[int(logits.argmax(1))]
        return label, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode_upload(data: bytes, preprocessing: dict, max_pixels: int) -> torch.Tensor:
    """Bytes -> the model's uint8 input, checking the size before decoding the pixels."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InputError(422, "empty file")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise InputError(
            415,
            "not an image, or a format that cannot be read (use JPEG, PNG, WebP, BMP, GIF or TIFF)",
        ) from None
    except Image.DecompressionBombError as e:
        raise InputError(413, f"image too large: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise InputError(413, f"image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_input_tensor(im, preprocessing)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(422, f"truncated or corrupt image ({e})") from None


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
):
    predictor = Predictor(model_path, backend)
    batcher = MicroBatcher(predictor.probabilities, max_batch, max_wait_ms)
    metrics = Metrics()

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

    async def read_uploads(request: Request) -> list[tuple[str, bytes | InputError]]:
        """(name, bytes or the error) for each uploaded file, sizes enforced."""
        length = request.headers.get("content-length")
        if length and int(length) > max_upload_bytes + 64 * 1024:  # allow multipart framing
            raise InputError(
                413, f"upload of {int(length):,} bytes; the limit is {max_upload_bytes:,}"
            )
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=256)
            files = [v for _, v in form.multi_items() if hasattr(v, "read")]
            if not files:
                raise InputError(422, "no files in the form: send them as 'files'")
            out = []
            for f in files:
                data = await f.read(max_upload_bytes + 1)
                if len(data) > max_upload_bytes:
                    out.append(
                        (
                            f.filename,
                            InputError(
                                413, f"file larger than the limit of {max_upload_bytes:,} bytes"
                            ),
                        )
                    )
                else:
                    out.append((f.filename or "upload", data))
            return out
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload_bytes:
                raise InputError(413, f"body larger than the limit of {max_upload_bytes:,} bytes")
        if not body:
            raise InputError(422, "empty body: send an image as the body or as multipart 'files'")
        return [("body", bytes(body))]

    def error_response(e: InputError) -> JSONResponse:
        metrics.errors[e.status] += 1
        return JSONResponse(
            {"error": {"status": e.status, "message": e.message}}, status_code=e.status
        )

    page_html = (
        Path(__file__)
        .with_name("page.html")
        .read_text()
        .replace("__TITLE__", f"cnnkit: {len(predictor.classes)} classes")
    )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return page_html

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
        try:
            uploads = await read_uploads(request)
        except InputError as e:
            return error_response(e)
        results: list[dict] = []
        ready: list[tuple[int, torch.Tensor]] = []
        for name, data in uploads:
            try:
                if isinstance(data, InputError):
                    raise data
                ready.append(
                    (len(results), decode_upload(data, predictor.preprocessing, max_pixels))
                )
                results.append({"file": name})
            except InputError as e:
                metrics.errors[e.status] += 1
                results.append({"file": name, "error": {"status": e.status, "message": e.message}})
        if ready:
            probs = await batcher.submit([t for _, t in ready])
            metrics.images += len(ready)
            n = min(k, len(predictor.classes))
            for (i, _), p in zip(ready, probs, strict=True):
                order = np.argsort(-p)[:n]
                results[i]["label"] = predictor.classes[order[0]]
                results[i]["top"] = [
                    {"class": predictor.classes[j], "probability": float(p[j])} for j in order
                ]
        status = 200 if ready else results[0]["error"]["status"]
        return JSONResponse({"predictions": results}, status_code=status)

    @app.post("/v1/explain")
    async def explain(request: Request):
        """Grad-CAM overlay (PNG data URI) for the predicted class of one image."""
        if not predictor.can_explain:
            return JSONResponse(
                {
                    "error": {
                        "status": 501,
                        "message": "Grad-CAM needs the "
                        "PyTorch model: serve the run directory, not the ONNX file",
                    }
                },
                status_code=501,
            )
        try:
            name, data = (await read_uploads(request))[0]
            if isinstance(data, InputError):
                raise data
            image = decode_upload(data, predictor.preprocessing, max_pixels)
        except InputError as e:
            return error_response(e)
        loop = asyncio.get_running_loop()
        label, uri = await loop.run_in_executor(batcher.executor, predictor.explain_png, image)
        return {"file": name, "label": label, "overlay": uri}

    return app


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    import uvicorn

    uvicorn.run(create_app(model_path, **kwargs), host=host, port=port, log_level="info")
