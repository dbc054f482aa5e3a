"""``cnnkit serve``: a REST API and a web page for a run or an exported ONNX file.

Endpoints: ``POST /v1/predict`` (multipart files or a raw image body), ``POST /v1/explain``
(Grad-CAM of one image, when serving a run), ``GET /v1/model``, ``GET /healthz``,
``GET /metrics`` (Prometheus text, from prometheus_client), ``GET /docs`` (Swagger UI, served
from this machine), ``GET /openapi.json`` and ``GET /`` (the page). When the served weights
were also exported as a web app (``cnnkit export RUN --format webapp``, into ``webapp/``
beside them), its files are served under ``GET /device/`` and the page links to it: the same
classifier running in the browser, on the visitor's device. The Open Inference Protocol
(KServe v2, with Triton's classification and binary tensor extensions) is served under ``/v2``
by ``v2.py``, through the same batcher and limits.

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

Reading uploads within their limits is in ``uploads.py``; what every request goes through
(the Host check, security headers, metrics, JSON 500s, the header deadline) in ``guard.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request  # this module is imported only to serve
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from cnnkit.evaluate.explain import explain_images
from cnnkit.runs.inference import answer, unpack_outputs
from cnnkit.runs.reject import Rejection
from cnnkit.runs.run import load_run

from .guard import (
    HEADER_TIMEOUT_ENV,
    HEADER_TIMEOUT_S,
    GuardMiddleware,
    HeaderTimeoutProtocol,
    Metrics,
    error_json,
    header_timeout_protocol,
    is_loopback,
)
from .onnx_model import OnnxModel
from .uploads import (
    MAX_PIXELS,
    MAX_UPLOAD_BYTES,
    UPLOAD_TIMEOUT_S,
    InputError,
    decode_upload,
    read_uploads,
)
from .v2 import add_v2_routes
from .webapp import MEDIA_TYPES, webapp_checkpoint, webapp_files

log = logging.getLogger("cnnkit.serve")

MAX_REQUEST_PIXELS = 100_000_000  # all the images of one request together
DECODE_THREADS = min(4, os.cpu_count() or 1)  # images decoded at once, across all requests
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
NONE = "'none'"
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; frame-ancestors 'none'"
)
# The web app under /device/: its own files, WebAssembly, the camera; nothing from elsewhere.
DEVICE_CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
    "img-src 'self' blob: data:; media-src 'self' blob: mediastream:; connect-src 'self'; "
    "worker-src 'self'; manifest-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


# ---------------------------------------------------------------- the model behind the API


class Predictor:
    """What the service needs of a model, for a run (PyTorch) or an ONNX file."""

    def __init__(self, path: str | Path, backend: str = "auto", reject: bool = True):
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
        # the "unknown" rule of the run or file (runs/reject.py); None: --reject off, or none
        self.rejection = Rejection.from_record(self.model.rejection) if reject else None
        # several labels per image: each label's threshold (its probability is a sigmoid)
        multilabel = self.model.multilabel
        self.thresholds = np.asarray(multilabel["thresholds"]) if multilabel else None
        if self.thresholds is not None:
            self.can_explain = False  # Grad-CAM of one class: not for a label set yet

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        return self.outputs(images)[0]

    def outputs(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, energy score or None) of a batch of uint8 images."""
        return unpack_outputs(self.model.outputs(images))

    def rows(self, images: torch.Tensor) -> list[tuple[np.ndarray, float | None]]:
        """(probabilities, out-of-distribution score or None) of each image: what the
        batcher answers each request with."""
        probs, energy = self.outputs(images)
        if self.rejection is None:
            return [(p, None) for p in probs]
        return list(zip(probs, self.rejection.values(probs, energy).tolist(), strict=True))

    def describe(self) -> dict:
        info = {
            "backend": self.backend,
            "path": str(self.path),
            "classes": self.classes,
            "input": self.preprocessing,
            "explain": self.can_explain,
            "rejection": self.rejection.to_dict() if self.rejection else None,
            "multilabel": (
                {"thresholds": self.thresholds.tolist()} if self.thresholds is not None else None
            ),
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


class Overloaded(Exception):
    """More images waiting than the server takes on: answered 503 with Retry-After."""


RETRY_AFTER_S = 1  # what an overloaded server tells a client to wait


class MicroBatcher:
    """Collects concurrent single-image requests into batches for one worker thread.

    ``on_batch`` is told the size of each batch (the metrics count them). At most
    ``max_queue`` images wait or run at once: past that, ``submit`` raises Overloaded at
    once (a 503), rather than queueing without bound while every answer grows late.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], Sequence],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int], None] | None = None,
        max_queue: int | None = None,
    ):
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch
        self.max_queue = max_queue or 4 * max_batch
        self.pending = 0  # images submitted and not yet answered
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

    def check_capacity(self, images: int = 1) -> None:
        """Raise Overloaded when ``images`` more would pass ``max_queue`` (a request larger
        than the queue is still taken when nothing waits)."""
        if self.pending and self.pending + images > self.max_queue:
            raise Overloaded(
                f"the server is at capacity ({self.pending} images waiting, at most "
                f"{self.max_queue}); retry in {RETRY_AFTER_S} s"
            )

    async def submit(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        self.check_capacity(len(images))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        self.pending += len(images)
        try:
            for image, future in zip(images, futures, strict=True):
                await self.queue.put((image, future))
            return list(await asyncio.gather(*futures))
        finally:
            self.pending -= len(images)

    def _run(self, images: list[torch.Tensor]) -> Sequence:
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


def device_app(predictor) -> dict[str, Path]:
    """The files of the web app exported from the served weights (``webapp/`` beside the run
    or ONNX file), by their path under /device/; empty when there is none, or when it was
    exported from other weights (a resumed run's old export: not offered, with a warning)."""
    path = getattr(predictor, "path", None)
    if path is None:
        return {}
    path = Path(path)
    folder = (path if path.is_dir() else path.parent) / "webapp"
    files = webapp_files(folder)
    if not files:
        return {}
    model = predictor.model
    served = getattr(model, "checkpoint_ref", None) or getattr(model, "provenance", {}).get(
        "checkpoint"
    )
    if webapp_checkpoint(folder) != served:
        log.warning(
            "%s was exported from other weights than these; /device/ is off until "
            "'cnnkit export RUN --format webapp' writes it again",
            folder,
        )
        return {}
    return files


def _hash_source(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def page_html(classes: list[str], device: bool = False) -> tuple[str, str]:
    """The web page, titled with the number of classes, and its Content-Security-Policy.

    ``device``: link to the web app at device/ (the model run in the browser).
    The policy allows the page's own inline script and style by their hashes, and nothing
    else: no other script, no framing by other sites.
    """
    page = Path(__file__).with_name("page.html").read_text()
    page = page.replace("__TITLE__", f"cnnkit: {len(classes)} classes")
    page = page.replace(" hidden data-device", "" if device else " hidden")
    scripts = " ".join(map(_hash_source, re.findall(r"<script>(.*?)</script>", page, re.S)))
    styles = " ".join(map(_hash_source, re.findall(r"<style>(.*?)</style>", page, re.S)))
    csp = (
        f"default-src 'none'; script-src {scripts or NONE}; style-src {styles or NONE}; "
        "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, csp


def _top_k_rows(
    rows: list[tuple[np.ndarray, float | None]],
    classes: list[str],
    k: int,
    rejection: Rejection | None = None,
    thresholds: np.ndarray | None = None,
) -> list[dict]:
    """{"label", "top": [{"class", "probability"}, ...]} for each (probabilities, score)
    row, most probable first; with ``rejection``, "unknown" and "ood" too (the label is
    "unknown" below the threshold); with ``thresholds`` (multi-label), "labels": every label
    over its own, and the label is their names joined by ';'. As ``predict`` answers."""
    probs = np.stack([p for p, _ in rows])
    values = [score for _, score in rows] if rejection is not None else None
    answered = answer(probs, classes, k, rejection, values, thresholds)
    return [{key: v for key, v in a.to_dict().items() if key != "source"} for a in answered]


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
        self.batcher.check_capacity()  # before reading and decoding anything
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
            outputs = await self.batcher.submit([t for _, t in ready])
            self.metrics.images.inc(len(ready))
            rows = _top_k_rows(
                outputs,
                self.predictor.classes,
                k,
                self.predictor.rejection,
                self.predictor.thresholds,
            )
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
    max_queue: int | None = None,
    reject: bool = True,
) -> FastAPI:
    """The FastAPI app serving the run or ONNX file at ``model_path``.

    ``host``: where the server is bound. Bound to a loopback address, the app
    answers 421 to requests whose Host header names another machine (DNS rebinding).
    ``max_queue``: images waiting or running at most before requests get 503 (default: 4
    batches). ``reject``: answer "unknown" below the model's out-of-distribution threshold
    (False: always the most probable class).
    """
    predictor = Predictor(model_path, backend, reject)
    metrics = Metrics(max_batch)
    batcher = MicroBatcher(
        predictor.rows,
        max_batch,
        max_wait_ms,
        on_batch=metrics.batch_size.observe,
        max_queue=max_queue,
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
    device_files = device_app(predictor)
    html, page_csp = page_html(predictor.classes, device=bool(device_files))
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
    app.add_middleware(GuardMiddleware, metrics=metrics, check_host=is_loopback(host))

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

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        # (counted with every answer by status, not as an input error: the input was fine)
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if request.url.path.startswith("/v2/"):  # the inference protocol's error shape
            return JSONResponse({"error": str(exc)}, status_code=503, headers=headers)
        response = error_json(503, str(exc))
        response.headers.update(headers)
        return response

    # Route functions carry no return annotation: FastAPI would take it for a response model.
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return HTMLResponse(html, headers={"Content-Security-Policy": page_csp})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(FAVICON_SVG, media_type="image/svg+xml")

    @app.get("/healthz")
    async def healthz():
        # worker: the process that answered (cnnkit serve --workers runs several)
        return {"status": "ok", "worker": os.getpid()}

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

    add_v2_routes(app, service)  # the Open Inference Protocol (KServe v2), in v2.py

    if device_files:

        @app.get("/device", include_in_schema=False)
        async def device_root():
            return RedirectResponse("device/")  # relative: works behind a path prefix too

        @app.api_route("/device/{name:path}", methods=["GET", "HEAD"], include_in_schema=False)
        async def device(name: str):
            """The web app's files (those of its folder only), as a static host would."""
            file = device_files.get(name or "index.html")
            if file is None:
                return error_json(404, f"no file device/{name}")
            return FileResponse(
                file,
                media_type=MEDIA_TYPES.get(file.suffix, "application/octet-stream"),
                # revalidated every time: the service worker sees a new export at once
                headers={"Content-Security-Policy": DEVICE_CSP, "Cache-Control": "no-cache"},
            )

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


# How long a stopping server (SIGTERM, Ctrl-C) waits for the requests it has accepted.
GRACEFUL_SHUTDOWN_S = 30
# --workers: the child processes build their app from this (a JSON of create_app's args).
APP_ENV = "CNNKIT_SERVE_APP"


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``serve(..., workers=N)``: each loads the model."""
    settings = json.loads(os.environ[APP_ENV])
    return create_app(settings.pop("model_path"), **settings)


def serve(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    workers: int = 1,
    **kwargs,
) -> None:
    """Serve ``model_path`` with uvicorn; ``kwargs`` go to ``create_app``.

    ``workers`` > 1: that many processes share the port (uvicorn's supervisor), each with
    the model loaded once and its own batcher and metrics. SIGTERM or Ctrl-C: the server
    stops accepting connections and answers the requests it has accepted (for at most
    GRACEFUL_SHUTDOWN_S) before it exits."""
    import uvicorn

    # Slow clients: idle keep-alive connections are closed after 5 s, headers that have not
    # arrived within header_timeout_s close the connection, and a body that trickles in is
    # answered 408 by the app (upload_timeout_s).
    common = {
        "host": host,
        "port": port,
        "log_level": "info",
        "timeout_keep_alive": 5,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }
    if workers <= 1:
        app = create_app(model_path, host=host, **kwargs)
        uvicorn.run(app, http=header_timeout_protocol(header_timeout_s), **common)
        return
    Predictor(model_path, kwargs.get("backend", "auto"))  # a bad model fails here, once
    os.environ[APP_ENV] = json.dumps({"model_path": str(model_path), "host": host, **kwargs})
    os.environ[HEADER_TIMEOUT_ENV] = str(header_timeout_s)
    uvicorn.run(
        "cnnkit.deploy.serve:app_from_environment",
        factory=True,
        workers=workers,
        http=HeaderTimeoutProtocol,  # the class itself: the workers' settings come by env
        **common,
    )
