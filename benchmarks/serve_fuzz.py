"""A bounded hostile-client run against `cnnkit serve` on 127.0.0.1, for both back ends (the
PyTorch run and its ONNX export): truncated and broken images, decompression bombs, wrong
``k``, chunked bodies over the limit, a lying Content-Length, bad Host headers, many unknown
and crafted paths, stalled bodies and stalled headers. One JSON line per attack and one
summary per back end: requests sent, statuses counted, the server's RSS before and after,
/healthz latency while bombs are being decoded, and the size of /metrics.

    python benchmarks/serve_fuzz.py [--run runs/NAME] [--onnx FILE]

Without --run it trains a tiny conv8-pool-fc16 on 1,000 MNIST digits first (a few seconds)
and exports it to ONNX. Every loop is bounded in count and in time; every request goes to
this machine only. The server runs in a child process through ``cnnkit.deploy.serve.serve``
(what ``cnnkit serve`` runs), with short slow-client timeouts so that the run stays short.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

HOST = "127.0.0.1"
SLOW_TIMEOUT_S = 3.0  # the server's upload and header timeouts in this run
MAX_UPLOAD_MB = 2.0


# ---------------------------------------------------------------- crafted inputs


def encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (32, 32)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, format=fmt)
    return buf.getvalue()


def crafted_files() -> list[tuple[str, bytes]]:
    """Truncated headers and bodies, broken fields, and things that are no image at all."""
    png, jpeg, ico, bmp, gif = (
        encoded("PNG"),
        encoded("JPEG"),
        encoded("ICO", "RGBA"),
        encoded("BMP"),
        encoded("GIF", "P"),
    )
    bad_depth = bytearray(bmp)
    bad_depth[28:30] = (7).to_bytes(2, "little")
    dds = bytearray(encoded("DDS", "RGBA"))
    dds[80:84] = (129).to_bytes(4, "little")
    files = [
        ("png-head.png", png[:8]),
        ("png-cut.png", png[:60]),
        ("jpeg-head.jpg", jpeg[:6]),
        ("jpeg-cut.jpg", jpeg[: len(jpeg) // 2]),
        ("ico-cut.ico", ico[:40]),
        ("ico-head.ico", ico[:22]),
        ("bmp-cut.bmp", bmp[:30]),
        ("bmp-depth.bmp", bytes(bad_depth)),
        ("gif-cut.gif", gif[:20]),
        ("dds-flags.dds", bytes(dds)),
        ("empty.png", b""),
        ("text.png", b"hello, not an image"),
        ("ok.png", png),
    ]
    return files


def bomb_png(side: int = 6000) -> bytes:
    """A PNG of side x side grey pixels: tens of KB that decode to side**2 pixels."""
    return encoded("PNG", "L", (side, side))


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, port: int) -> subprocess.Popen:
    code = (
        "import sys; from cnnkit.deploy.serve import serve; "
        f"serve(sys.argv[1], host={HOST!r}, port={port}, header_timeout_s={SLOW_TIMEOUT_S}, "
        f"upload_timeout_s={SLOW_TIMEOUT_S}, max_upload_bytes={int(MAX_UPLOAD_MB * 2**20)})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, model], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server for {model} did not start")


# ---------------------------------------------------------------- raw-socket attacks


def status_of(sock: socket.socket, timeout: float) -> int | None:
    """The status of the response on ``sock``, None if it is closed or silent."""
    sock.settimeout(timeout)
    try:
        head = sock.recv(4096)
    except (TimeoutError, ConnectionResetError):
        return None
    return int(head.split()[1]) if head.startswith(b"HTTP/") else None


def chunked_oversize(port: int, offer_mb: int = 64) -> tuple[int | None, int]:
    """A chunked multipart body offering ``offer_mb`` MB: (status, bytes sent before it)."""
    with socket.create_connection((HOST, port), 10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n"
        )
        part = b'--xx\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        chunk, sent = b"\0" * 65536, 0
        deadline = time.monotonic() + 20
        for i in range(offer_mb * 16):
            data = part if i == 0 else chunk
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(data)
            if select.select([sock], [], [], 0)[0] or time.monotonic() > deadline:
                break
        return status_of(sock, 10), sent


def lying_length(port: int) -> int | None:
    """Content-Length 100, then 3 MB of body."""
    with socket.create_connection((HOST, port), 10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
            b"Content-Type: image/png\r\n\r\n"
        )
        try:
            for _ in range(48):
                sock.sendall(b"\0" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return status_of(sock, 10)


def bad_host(port: int, host: bytes) -> int | None:
    with socket.create_connection((HOST, port), 10) as sock:
        sock.sendall(b"GET /v1/model HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        return status_of(sock, 10)


def slow_clients(port: int, count: int, body: bool) -> dict:
    """``count`` connections that stall: in the body (``body``) or in the headers. How many
    the server answered or closed within the timeout plus 5 s, and how many it still held."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection((HOST, port), 10)
        if body:
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                b"Content-Type: image/png\r\n\r\n\x89PNG"
            )
        else:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.")
        socks.append(sock)
    t0 = time.monotonic()
    open_socks, outcomes = set(socks), Counter()
    while open_socks and time.monotonic() - t0 < SLOW_TIMEOUT_S + 5:
        readable, _, _ = select.select(list(open_socks), [], [], 0.5)
        for sock in readable:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            outcomes[str(int(data.split()[1])) if data.startswith(b"HTTP/") else "closed"] += 1
            open_socks.discard(sock)
    seconds = time.monotonic() - t0
    for sock in socks:
        sock.close()
    return {"statuses": dict(outcomes), "still_held": len(open_socks), "seconds": round(seconds, 1)}


# ---------------------------------------------------------------- one back end


def fuzz(model: str, backend: str) -> list[dict]:
    port = free_port()
    base = f"http://{HOST}:{port}"
    proc = start_server(model, port)
    lines: list[dict] = []

    def line(attack: str, statuses: Counter | dict, **extra) -> None:
        statuses = dict(sorted(Counter(statuses).items()))
        record = {"benchmark": "serve-fuzz", "backend": backend, "attack": attack}
        lines.append({**record, "requests": sum(statuses.values()), "statuses": statuses, **extra})
        print(json.dumps(lines[-1]), flush=True)

    try:
        client = httpx.Client(base_url=base, timeout=30)
        files = crafted_files()
        client.post("/v1/predict", files=[("files", files[-1])])  # warm up
        rss_before = rss_mb(proc.pid)

        # broken images: one request per file, then all of them in one request
        statuses: Counter = Counter()
        per_file: Counter = Counter()
        for name, data in files:
            statuses[client.post("/v1/predict", files=[("files", (name, data))]).status_code] += 1
        r = client.post("/v1/predict", files=[("files", f) for f in files])
        statuses[r.status_code] += 1
        for p in r.json()["predictions"]:
            per_file[p.get("error", {}).get("status", 200)] += 1
        line("broken-images", statuses, files_in_one_request=dict(sorted(per_file.items())))

        # wrong k
        ks = ["0", "-1", "-10", "11", "1000", "abc", "1.5", "", "3"]
        statuses = Counter(
            client.post(f"/v1/predict?k={k}", files=[("files", files[-1])]).status_code for k in ks
        )
        line("wrong-k", statuses)

        # decompression bombs: 3 requests of 20 PNGs of 6000x6000 at once, /healthz probed
        bomb = bomb_png()
        bombs = [("files", (f"bomb{i}.png", bomb)) for i in range(20)]
        latencies: list[float] = []
        with ThreadPoolExecutor(3) as pool:
            t0 = time.monotonic()
            heavy = [pool.submit(client.post, "/v1/predict", files=bombs) for _ in range(3)]
            while not all(f.done() for f in heavy) and time.monotonic() - t0 < 120:
                t = time.perf_counter()
                client.get("/healthz")
                latencies.append(time.perf_counter() - t)
                time.sleep(0.05)
            results = [f.result(120) for f in heavy]
        bomb_seconds = time.monotonic() - t0
        per_file = Counter(
            p.get("error", {}).get("status", 200) for r in results for p in r.json()["predictions"]
        )
        line(
            "bombs",
            Counter(r.status_code for r in results),
            bomb_bytes=len(bomb),
            files_per_request=len(bombs),
            file_statuses=dict(sorted(per_file.items())),
            seconds=round(bomb_seconds, 2),
            healthz_probes=len(latencies),
            healthz_ms_median=round(1000 * statistics.median(latencies), 1),
            healthz_ms_max=round(1000 * max(latencies), 1),
        )

        # bodies over the limit: chunked, and with a Content-Length that lies
        oversize = [chunked_oversize(port) for _ in range(3)]
        line(
            "chunked-oversize",
            Counter(s for s, _ in oversize),
            offered_mb=64,
            sent_mb_max=round(max(n for _, n in oversize) / 2**20, 1),
        )
        line("lying-content-length", Counter(lying_length(port) for _ in range(3)))

        # DNS rebinding: Host headers that are not this machine
        hosts = [b"evil.example", b"evil.example:%d" % port, b"127.0.0.1.evil.example", b""]
        hosts += [b"127.0.0.1:1", b"[::1]x", b"localhost.:%d" % port]
        line("bad-host", Counter(bad_host(port, h) for h in hosts * 3))

        # unknown and crafted paths, then the size of /metrics
        crafted = ["/x%22%7D%201%0A%23%20TYPE%20boom%20counter", "/%00", "/..%2F..%2Fetc"]
        paths = [f"/unknown/{i}" for i in range(1000)] + crafted * 10
        statuses = Counter(client.get(p).status_code for p in paths)
        text = client.get("/metrics").text
        from prometheus_client.parser import text_string_to_metric_families

        families = list(text_string_to_metric_families(text))  # raises if the page is broken
        line(
            "unknown-paths",
            statuses,
            metrics_bytes=len(text.encode()),
            metrics_families=len(families),
        )

        # other methods and endpoints
        statuses = Counter(
            [
                client.head("/").status_code,
                client.delete("/v1/predict").status_code,
                client.post("/v1/explain", files=[("files", files[-1])] * 2).status_code,
                client.get("/docs").status_code,
                client.get("/favicon.ico").status_code,
            ]
        )
        line("methods-and-pages", statuses)

        # slow clients: stalled bodies (408 expected) and stalled headers (closed)
        client.close()
        for body in (True, False):
            result = slow_clients(port, 100, body)
            line("slow-body" if body else "slow-headers", result.pop("statuses"), **result)

        with httpx.Client(base_url=base, timeout=30) as after:
            text = after.get("/metrics").text
            healthy = after.get("/healthz").status_code
        errors_500 = sum(
            s.value
            for f in text_string_to_metric_families(text)
            if f.name == "cnnkit_requests"
            for s in f.samples
            if s.name == "cnnkit_requests_total" and s.labels["status"] == "500"
        )
        summary = {
            "benchmark": "serve-fuzz",
            "backend": backend,
            "summary": True,
            "requests": sum(x["requests"] for x in lines),
            "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_mb(proc.pid), 1),
            "server_500s": errors_500,
            "healthz_after": healthy,
            "metrics_bytes": len(text.encode()),
        }
        print(json.dumps(summary), flush=True)
        return [*lines, summary]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def tiny_models(workdir: Path) -> tuple[str, str]:
    import cnnkit
    from cnnkit.deploy.export import export_onnx

    run = cnnkit.train(
        data="mnist",
        model="conv8-pool-fc16",
        epochs=1,
        limit=1000,
        runs_dir=str(workdir),
        quiet=True,
    )
    onnx = export_onnx(run, workdir / "tiny.onnx", check_images=200)
    return str(run.path), str(onnx.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run directory (default: train a tiny one)")
    parser.add_argument("--onnx", help="an exported .onnx file (default: export the run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run and args.onnx:
            run, onnx = args.run, args.onnx
        elif args.run:
            import cnnkit
            from cnnkit.deploy.export import export_onnx

            run = args.run
            onnx = str(export_onnx(cnnkit.load_run(run), Path(tmp) / "m.onnx").path)
        else:
            run, onnx = tiny_models(Path(tmp))
        print(json.dumps({"benchmark": "serve-fuzz", "cpu": cpu_model()}), flush=True)
        for model, backend in ((run, "torch"), (onnx, "onnx")):
            fuzz(model, backend)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    return "unknown"


if __name__ == "__main__":
    main()
