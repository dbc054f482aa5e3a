"""A bounded load test of `cnnkit serve` on 127.0.0.1. One JSON line per measurement.

Default: requests/s and latency percentiles for the PyTorch and ONNX Runtime backends,
with and without micro-batching, at concurrency 1, 8 and 32, each for a fixed duration.

--scale: 1 and 2 server processes (--workers) at concurrency 1, 8, 32 and 128, for the
seed-cnn on MNIST digits and EfficientNet-Lite0 at 224 px on a cats-vs-dogs photo (the
PyTorch backend), with the load generator's own CPU use (CPU seconds per second: on a
2-core machine the generator and the server share the cores); then the overload behaviour
(Lite0 with --max-queue 8 at concurrency 64: how many answers are 503 and how fast they
come) and a soak (--soak seconds at concurrency 8, the server's memory, all its processes,
sampled every 5 s).

    python benchmarks/serve_load.py [--run runs/NAME] [--seconds 4]
    CNNKIT_DATA=... python benchmarks/serve_load.py --scale [--seconds 4] [--soak 180]

Without --run it trains a small seed-cnn on MNIST first (about 15 s); --scale also
fine-tunes Lite0's head on 64 photos (about a minute). Never fails on timing; every request
goes to this machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digit_png() -> bytes:
    from PIL import Image

    from cnnkit.data import load_dataset

    image = load_dataset("mnist", val_split=0).test.images[0, 0].numpy()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


async def load(
    url: str, body: bytes, concurrency: int, seconds: float, content_type: str = "image/png"
) -> dict:
    latencies: list[float] = []
    by_status: dict[int, list[float]] = {}
    stop = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await client.post(url, content=body, headers={"content-type": content_type})
            latency = time.perf_counter() - t0
            latencies.append(latency)
            by_status.setdefault(r.status_code, []).append(latency)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": len(latencies) - len(by_status.get(200, [])),
        "statuses": {str(k): len(v) for k, v in sorted(by_status.items())},
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        # the load generator's own CPU: seconds of CPU per second of the test
        "generator_cpu_share": round(cpu / elapsed, 2),
        "p50_ms_by_status": {
            str(k): round(float(np.percentile(np.array(v) * 1000, 50)), 2)
            for k, v in sorted(by_status.items())
        },
    }


def start_server(
    model: str, backend: str, max_batch: int, *extra: str
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnnkit",
            "serve",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend",
            backend,
            "--max-batch",
            str(max_batch),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server for {model} did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a run directory (default: train a small one)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--scale", action="store_true", help="workers, overload and soak (above)")
    p.add_argument("--soak", type=float, default=180.0, help="--scale: soak seconds")
    args = p.parse_args()
    if args.scale:
        return scale(args)

    import cnnkit
    from cnnkit.deploy.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        run = (
            cnnkit.load_run(args.run)
            if args.run
            else cnnkit.train(
                data="mnist", model="seed-cnn", epochs=1, limit=5000, runs_dir=tmp, quiet=True
            )
        )
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(run, onnx_path, check_images=200)
        body = digit_png()
        for backend, model in (("torch", str(run.path)), ("onnx", str(onnx_path))):
            for max_batch in (32, 1):
                proc, base = start_server(model, backend, max_batch)
                try:
                    for concurrency in (1, 8, 32):
                        result = asyncio.run(
                            load(base + "/v1/predict", body, concurrency, args.seconds)
                        )
                        print(
                            json.dumps(
                                {
                                    "benchmark": "serve-load",
                                    "backend": backend,
                                    "batching": max_batch > 1,
                                    "concurrency": concurrency,
                                    "seconds": args.seconds,
                                    "cpus": os.cpu_count(),
                                    **result,
                                }
                            ),
                            flush=True,
                        )
                finally:
                    proc.terminate()
                    proc.wait(10)


def emit(record: dict) -> None:
    print(json.dumps({"benchmark": "serve-load", "cpus": os.cpu_count(), **record}), flush=True)


def server_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the workers), in MiB."""
    total = 0
    for p in [pid, *children_of(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def children_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def scale_models(tmp: str) -> list[tuple[str, str, bytes, str]]:
    """(name, run directory, request body, its content type) of the two models."""
    import cnnkit

    mnist = cnnkit.train(
        data="mnist", model="seed-cnn", epochs=1, limit=5000, runs_dir=tmp, quiet=True
    )
    photos = Path(os.environ.get("CNNKIT_DATA", "")) / "cats_vs_dogs"
    lite0 = cnnkit.train(
        data=str(photos), model="efficientnet_lite0", pretrained=True, image_size=224,
        limit=64, epochs=1, runs_dir=tmp, quiet=True,
    )  # fmt: skip
    cat = next((photos / "validation" / "cats").glob("*.jpg")).read_bytes()
    return [
        ("seed-cnn/mnist", str(mnist.path), digit_png(), "image/png"),
        ("efficientnet_lite0/224px", str(lite0.path), cat, "image/jpeg"),
    ]


def scale(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = scale_models(tmp)
        for name, run_dir, body, kind in models:
            for workers in (1, 2):
                proc, base = start_server(run_dir, "auto", 32, "--workers", str(workers))
                try:
                    for concurrency in (1, 8, 32, 128):
                        result = asyncio.run(
                            load(base + "/v1/predict", body, concurrency, args.seconds, kind)
                        )
                        emit(
                            {
                                "kind": "throughput",
                                "model": name,
                                "workers": workers,
                                "concurrency": concurrency,
                                "seconds": args.seconds,
                                **result,
                            }
                        )
                finally:
                    proc.terminate()
                    proc.wait(60)
        name, run_dir, body, kind = models[1]
        proc, base = start_server(run_dir, "auto", 32, "--max-queue", "8")
        try:
            result = asyncio.run(load(base + "/v1/predict", body, 64, args.seconds, kind))
            emit({"kind": "overload", "model": name, "max_queue": 8, "concurrency": 64, **result})
        finally:
            proc.terminate()
            proc.wait(60)
        name, run_dir, body, kind = models[0]
        proc, base = start_server(run_dir, "auto", 32)
        try:
            samples, t0 = [], time.perf_counter()
            while time.perf_counter() - t0 < args.soak:
                result = asyncio.run(load(base + "/v1/predict", body, 8, 5.0, kind))
                samples.append(
                    {
                        "t_s": round(time.perf_counter() - t0),
                        "rss_mb": server_rss_mb(proc.pid),
                        "requests_per_s": result["requests_per_s"],
                        "errors": result["errors"],
                    }
                )
            emit(
                {
                    "kind": "soak",
                    "model": name,
                    "concurrency": 8,
                    "seconds": round(time.perf_counter() - t0),
                    "rss_mb_first_last_max": [
                        samples[0]["rss_mb"],
                        samples[-1]["rss_mb"],
                        max(s["rss_mb"] for s in samples),
                    ],
                    "errors": sum(s["errors"] for s in samples),
                    "samples": samples,
                }
            )
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
