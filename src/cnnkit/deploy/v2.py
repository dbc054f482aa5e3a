"""The Open Inference Protocol (KServe v2, as Triton speaks it) beside ``cnnkit serve``'s own API.

``GET /v2`` (server metadata), ``GET /v2/health/live``, ``GET /v2/health/ready``,
``GET /v2/models/{name}[/versions/1]`` (model metadata), ``GET .../ready`` and
``POST .../infer``: one input tensor ``images`` (UINT8, ``[N, C, H, W]`` at the model's input
size), one output ``probabilities`` (FP32, ``[N, K]``). Two of the protocol's extensions:
``classification`` (an output asked for with ``parameters: {"classification": k}`` is BYTES
``[N, k]`` of ``"score:index:label"``, best first) and ``binary_tensor_data`` (the JSON header's
length in ``Inference-Header-Content-Length``, tensors' raw bytes after it), which the official
``tritonclient.http`` client uses by default.

The model's name is the served run's directory name (the ONNX file's stem); its one version
is ``"1"``. Images go through the service's batcher, so v2 and v1 requests batch together;
a body is read within ``max_upload_bytes`` and ``upload_timeout_s`` and a request's images
within ``max_request_pixels``, as for v1. Errors are the protocol's ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from cnnkit.evaluate.metrics import ranked_classes
from cnnkit.version import __version__

from .uploads import InputError, bounded_receive

VERSION = "1"
INPUT = "images"
OUTPUT = "probabilities"
EXTENSIONS = ["classification", "binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
TAGS = ["Open Inference Protocol (v2)"]


def model_name(predictor) -> str:
    """The run directory's name, or the ONNX file's stem."""
    path = getattr(predictor, "path", None)
    if path is None:
        return "model"
    path = Path(path).resolve()
    return path.stem if path.suffix == ".onnx" else path.name


def v2_error(status: int, message: str) -> JSONResponse:
    """The protocol's error shape."""
    return JSONResponse({"error": message}, status_code=status)


class Request400(InputError):
    def __init__(self, message: str):
        super().__init__(400, message)


def _shape(predictor) -> tuple[int, int, int]:
    pre = predictor.preprocessing
    height, width = pre["size"]
    return int(pre["channels"]), int(height), int(width)


def parse_infer(
    body: bytes, header_length: int | None, chw: tuple[int, int, int], max_images: int
) -> tuple[dict, np.ndarray]:
    """(the request's JSON, its images as uint8 (N, C, H, W)); InputError if unusable.

    CPU work on a body of up to ``max_upload_bytes``: run it off the event loop.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 <= header_length <= len(body):
            raise Request400(f"{HEADER_LENGTH} is {header_length}; the body has {len(body)} bytes")
        header, binary = body[:header_length], body[header_length:]
    try:
        request = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Request400(f"malformed JSON: {e}") from None
    if not isinstance(request, dict):
        raise Request400("the inference request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise Request400(f"'inputs' must be a list holding one tensor, '{INPUT}'")
    for tensor in inputs:
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if name != INPUT:
            raise Request400(f"unknown input {name!r}: the model's one input is '{INPUT}'")
    if len(inputs) > 1:
        raise Request400(f"input '{INPUT}' given {len(inputs)} times")
    [tensor] = inputs
    if tensor.get("datatype") != "UINT8":
        raise Request400(
            f"input '{INPUT}' has datatype {tensor.get('datatype')!r}; the model takes UINT8"
        )
    shape = tensor.get("shape")
    c, h, w = chw
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[1:] != [c, h, w]
    ):
        raise Request400(f"input '{INPUT}' has shape {shape}; the model takes [N, {c}, {h}, {w}]")
    n = shape[0]
    if n < 1:
        raise Request400(f"input '{INPUT}' has shape {shape}: N must be at least 1")
    if n > max_images:
        raise InputError(
            413, f"{n} images of {h}x{w} in one request; the limit is {max_images:,} at this size"
        )
    count = n * c * h * w
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise Request400(f"input '{INPUT}': 'parameters' must be an object")
    if "shared_memory_region" in parameters:
        raise Request400("shared memory is not supported")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if "data" in tensor:
            raise Request400(f"input '{INPUT}' has both 'data' and binary_data_size")
        if size != len(binary):
            raise Request400(
                f"input '{INPUT}' has binary_data_size {size!r}; "
                f"{len(binary)} bytes follow the JSON header"
            )
        if size != count:
            raise Request400(
                f"input '{INPUT}' of shape {shape} needs {count:,} bytes; "
                f"binary_data_size is {size:,}"
            )
        array = np.frombuffer(binary, dtype=np.uint8).copy()  # writable, for torch
    else:
        if binary:
            raise Request400(f"{len(binary)} bytes after the JSON header that no input claims")
        if "data" not in tensor:
            raise Request400(f"input '{INPUT}' has no 'data' and no binary_data_size")
        try:
            array = np.asarray(tensor["data"])
        except ValueError:  # ragged nested lists
            raise Request400(f"input '{INPUT}': 'data' is not a regular array") from None
        if array.dtype.kind not in "iu":
            raise Request400(f"input '{INPUT}': 'data' must hold integers from 0 to 255")
        if array.size != count:
            raise Request400(
                f"input '{INPUT}' of shape {shape} needs {count:,} values; 'data' has "
                f"{array.size:,}"
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise Request400(f"input '{INPUT}': 'data' must hold integers from 0 to 255")
        array = array.astype(np.uint8)
    return request, array.reshape(n, c, h, w)


def requested_outputs(request: dict, classes: int) -> list[tuple[int, bool]]:
    """(classification k or 0 for the probabilities, binary?) for each output to send."""
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise Request400("'parameters' must be an object")
    binary_default = bool(parameters.get("binary_data_output", False))
    outputs = request.get("outputs")
    if outputs is None:
        return [(0, binary_default)]
    if not isinstance(outputs, list):
        raise Request400("'outputs' must be a list")
    out = []
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if name != OUTPUT:
            raise Request400(f"unknown output {name!r}: the model's one output is '{OUTPUT}'")
        params = output.get("parameters") or {}
        if not isinstance(params, dict):
            raise Request400(f"output '{OUTPUT}': 'parameters' must be an object")
        if "shared_memory_region" in params:
            raise Request400("shared memory is not supported")
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= classes:
            raise Request400(f"classification must be from 1 to {classes}; got {k!r}")
        out.append((k, bool(params.get("binary_data", binary_default))))
    return out


def classification(probs: np.ndarray, classes: list[str], k: int) -> np.ndarray:
    """(N, k) of "score:index:label", best first (Triton's format, score as C's %f)."""
    indices = ranked_classes(torch.from_numpy(probs), k).numpy()
    rows = [
        [f"{row[j]:f}:{j}:{classes[j]}" for j in idx]
        for row, idx in zip(probs, indices, strict=True)
    ]
    return np.array(rows, dtype=object).reshape(len(probs), k)


def _bytes_tensor(strings: np.ndarray) -> bytes:
    """BYTES elements as the binary extension sends them: 4-byte little-endian length, bytes."""
    out = bytearray()
    for s in strings.flat:
        b = s.encode()
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


def infer_response(
    request: dict, name: str, probs: np.ndarray, classes: list[str], outputs
) -> Response:
    """The inference response, JSON or JSON header + binary tensors."""
    tensors, blobs = [], []
    for k, binary in outputs:
        if k:
            value = classification(probs, classes, k)
            tensor = {"name": OUTPUT, "datatype": "BYTES", "shape": list(value.shape)}
            raw = _bytes_tensor(value) if binary else None
            data = value.reshape(-1).tolist()
        else:
            value = probs.astype(np.float32)
            tensor = {"name": OUTPUT, "datatype": "FP32", "shape": list(value.shape)}
            raw = value.astype("<f4").tobytes() if binary else None
            data = value.reshape(-1).tolist() if not binary else None
        if binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = data
        tensors.append(tensor)
    body = {"model_name": name, "model_version": VERSION, "outputs": tensors}
    if "id" in request:
        body["id"] = request["id"]
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def add_v2_routes(app: FastAPI, service) -> None:
    """The protocol's routes, on ``app``, over ``service`` (serve.Service: its predictor,
    batcher, metrics and limits).

    Added to the app itself, not as an included router: the metrics label each request by
    its route's template, which they read from the app's own routes.
    """
    predictor, metrics = service.predictor, service.metrics
    name = model_name(predictor)
    c, h, w = _shape(predictor)
    classes: list[str] = predictor.classes
    backend = getattr(predictor, "backend", "torch")

    def ready() -> bool:
        task = service.batcher.task
        return task is not None and not task.done()

    def reject(e: InputError) -> JSONResponse:
        metrics.input_error(e.status)
        return v2_error(e.status, e.message)

    def unknown(model: str, version: str | None) -> JSONResponse | None:
        if model != name:
            return v2_error(404, f"unknown model {model!r}: this server serves {name!r}")
        if version is not None and version != VERSION:
            return v2_error(404, f"model {name!r} has no version {version!r}; it has '1'")
        return None

    @app.get("/v2", tags=TAGS)
    async def server_metadata():
        return {"name": "cnnkit", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live", tags=TAGS)
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=TAGS)
    async def server_ready():
        return JSONResponse({"ready": ready()}, status_code=200 if ready() else 503)

    def metadata(model: str, version: str | None):
        return unknown(model, version) or {
            "name": name,
            "versions": [VERSION],
            "platform": "onnxruntime_onnx" if backend == "onnx" else "cnnkit_pytorch",
            "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, c, h, w]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(classes)]}],
            "parameters": {"labels": classes, "preprocessing": predictor.preprocessing},
        }

    @app.get("/v2/models/{model}", tags=TAGS)
    async def model_metadata(model: str):
        return metadata(model, None)

    @app.get("/v2/models/{model}/versions/{version}", tags=TAGS)
    async def model_version_metadata(model: str, version: str):
        return metadata(model, version)

    def model_ready(model: str, version: str | None):
        error = unknown(model, version)
        if error:
            return error
        return JSONResponse({"name": name, "ready": ready()}, status_code=200 if ready() else 503)

    @app.get("/v2/models/{model}/ready", tags=TAGS)
    async def model_is_ready(model: str):
        return model_ready(model, None)

    @app.get("/v2/models/{model}/versions/{version}/ready", tags=TAGS)
    async def model_version_is_ready(model: str, version: str):
        return model_ready(model, version)

    async def infer(request: Request, model: str, version: str | None):
        error = unknown(model, version)
        if error:
            return error
        service.batcher.check_capacity()  # a 503 before reading anything, when overloaded
        try:
            encoding = request.headers.get("content-encoding", "identity").lower()
            if encoding != "identity":
                raise InputError(415, f"Content-Encoding {encoding} is not supported")
            header_length = request.headers.get(HEADER_LENGTH)
            if header_length is not None and not header_length.strip().isdigit():
                raise Request400(f"{HEADER_LENGTH} must be a number of bytes")
            body = await read_body(request)
            max_images = max(1, service.max_request_pixels // (h * w))
            loop = asyncio.get_running_loop()
            # parsing a body of up to max_upload_bytes: in the decode pool, not on the loop
            parsed, images = await loop.run_in_executor(
                service.decoder,
                parse_infer,
                body,
                None if header_length is None else int(header_length),
                (c, h, w),
                max_images,
            )
            outputs = requested_outputs(parsed, len(classes))
        except InputError as e:
            return reject(e)
        tensors = [torch.from_numpy(image) for image in images]
        rows = await service.batcher.submit(tensors)  # Overloaded: 503 (serve.py)
        probs = np.stack([p for p, _ in rows])
        metrics.images.inc(len(tensors))
        return await loop.run_in_executor(  # a large JSON answer is CPU work too
            service.decoder, infer_response, parsed, name, probs, classes, outputs
        )

    async def read_body(request: Request) -> bytes:
        limit = service.max_upload_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise InputError(413, f"body of {int(length):,} bytes; the limit is {limit:,}")
        receive = bounded_receive(request.receive, limit, service.upload_timeout_s)
        body = bytearray()
        try:
            async for chunk in Request(request.scope, receive).stream():
                body += chunk
        except ClientDisconnect:
            raise Request400("the client went away before the body was complete") from None
        return bytes(body)

    @app.post("/v2/models/{model}/infer", tags=TAGS)
    async def model_infer(request: Request, model: str):
        """Classify a UINT8 tensor [N, C, H, W] (JSON or the binary tensor data extension)."""
        return await infer(request, model, None)

    @app.post("/v2/models/{model}/versions/{version}/infer", tags=TAGS)
    async def model_version_infer(request: Request, model: str, version: str):
        return await infer(request, model, version)
