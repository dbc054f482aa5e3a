"""A bounded load test of `cnnkit serve` on 127.0.0.1: requests/s and latency percentiles
for the PyTorch and ONNX Runtime backends, with and without micro-batching, at
concurrency 1, 8 and 32, each for a fixed duration. One JSON line per measurement.

    python benchmarks/serve_load.py [--run runs/NAME] [--seconds 4]

Without --run it trains a small seed-cnn on MNIST first (about 15 s). Never fails on
timing; every request goes to this machine only.
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


async def load(url: str, body: bytes, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await client.post(url, content=body, headers={"content-type": "image/png"})
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def start_server(model: str, backend: str, max_batch: int) -> tuple[subprocess.Popen, str]:
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
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
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
    args = p.parse_args()

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


if __name__ == "__main__":
    main()
