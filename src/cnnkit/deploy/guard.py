"""What every request to ``cnnkit serve`` goes through, whatever its route: the Host check
(DNS rebinding), the security headers, the Prometheus metrics, a JSON answer for a failure,
and a deadline for a request's headers (slowloris)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as prometheus_text
from starlette.datastructures import MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("cnnkit.serve")

HEADER_TIMEOUT_S = 10.0  # for the request line and headers, from connecting or the last answer
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UNMATCHED_PATH = "(unmatched)"  # the one metrics label of every path no route serves
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Responses other than the page and /docs: nothing to run, and not to be framed.
API_CSP = "default-src 'none'; frame-ancestors 'none'"


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


def error_json(status: int, message: str) -> JSONResponse:
    """The API's error shape: ``{"error": {"status", "message"}}``."""
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


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


def host_allowed(value: str) -> bool:
    """Whether a Host header names this machine, on any port (see below)."""
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name += "]"
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    else:
        name, sep, port_text = value.partition(":")
        port_text = port_text if sep else None
    # The name is what DNS rebinding changes; the port is not checked, since an SSH tunnel
    # or a local proxy forwards from another one (Host: localhost:9000 for a server on 8000).
    return name.lower() in LOOPBACK_HOST_NAMES and (port_text is None or port_text.isdigit())


def route_template(app: ASGIApp, scope: Scope) -> str:
    """The path template of the route that serves ``scope`` (``UNMATCHED_PATH`` if none)."""
    routes = getattr(getattr(app, "router", None), "routes", [])
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        # (a route with no path of its own, such as an included router, names none)
        path = getattr(route, "path", None)
        if match == Match.FULL:
            return path or UNMATCHED_PATH
        if match == Match.PARTIAL and partial is None:  # the path, but not the method
            partial = path
    return partial or UNMATCHED_PATH


class GuardMiddleware:
    """Around every HTTP request: the Host check, security headers, metrics, and a JSON 500.

    A plain ASGI middleware (not ``@app.middleware``): an exception from an endpoint passes
    through it, so a failure is counted and answered as JSON like any other status.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, check_host: bool):
        self.app, self.metrics, self.check_host = app, metrics, check_host

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
            if self.check_host and not host_allowed(host):
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


# serve --workers: the header deadline of the worker processes, which import this module
HEADER_TIMEOUT_ENV = "CNNKIT_HEADER_TIMEOUT_S"


class HeaderTimeoutProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, closing a connection whose request line and headers have not
    all arrived ``seconds`` after it opened or after its last response (slowloris).

    uvicorn times out idle keep-alive connections, and the app times out a slow body, but
    nothing in uvicorn bounds the wait for headers: a client sending them a byte at a time
    holds its connection for ever. Both of uvicorn's HTTP protocols set ``cycle`` when a
    request's headers are complete; that is what the timer looks at.

    A class at module level (uvicorn's worker processes import it by name); ``seconds``
    comes from $CNNKIT_HEADER_TIMEOUT_S there, from ``header_timeout_protocol`` in one
    process.
    """

    seconds = float(os.environ.get(HEADER_TIMEOUT_ENV, HEADER_TIMEOUT_S))
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
        self.header_timer = self.loop.call_later(self.seconds, self.headers_too_slow)

    def headers_too_slow(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request begun
        if waiting and not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT_S) -> type:
    """HeaderTimeoutProtocol with a deadline of ``seconds``."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"seconds": seconds})
