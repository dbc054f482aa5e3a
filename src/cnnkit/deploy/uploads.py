"""Reading an upload within its limits: the body counted as it arrives (whatever its
framing says), a deadline for the whole of it, each file of a form apart, and each image
decoded with its pixels checked from the header first. Every failure is an ``InputError``
carrying the HTTP status to answer with."""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from cnnkit.data.decode import (
    EmptyImageError,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    open_image,
    to_input_tensor,
)

log = logging.getLogger("cnnkit.serve")

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000  # about a 7,300 x 5,500 photo
UPLOAD_TIMEOUT_S = 30.0  # for the whole body: a client that trickles it is cut off
MULTIPART_FRAMING_BYTES = 64 * 1024  # allowed on top of max_upload_bytes in a form
NOT_AN_IMAGE = (
    "not an image, or a format that cannot be read (use JPEG, PNG, WebP, BMP, GIF or TIFF)"
)


class InputError(Exception):
    """An upload that cannot be used; ``status`` is the HTTP status to answer with.

    ``size``: (width, height) of an image refused for its pixels, from its header.
    """

    def __init__(self, status: int, message: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.status, self.message, self.size = status, message, size


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
        # A decoder plug-in that fails in a way open_image does not expect: still this
        # file's fault, not ours.
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
