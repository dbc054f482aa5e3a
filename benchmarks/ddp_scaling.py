"""Data-parallel training: images/s for 1..N processes, and what a gradient all-reduce costs.

1. Training throughput. ``cnnkit train --nproc N`` on MNIST with the same global batch for
   every N, rounds interleaved (1, 2, 1, 2, ...) so that a slow spell of the machine hits
   every setting alike. The figure is metrics.csv's images/s of the epochs after the
   first (the first pays for start-up and allocation). Scaling efficiency is
   images/s at N / (N x images/s at 1).
2. All-reduce. N processes (gloo on CPUs, NCCL on GPUs, loopback rendezvous) sum a float32
   tensor the size of the model's gradients, as DDP does each step (it splits it into
   25 MB buckets; this model's gradients fit in one): the median milliseconds per call.

On a 2-core CPU the two processes share the cores that one process already used with two
threads, so the figure shows the overhead of data parallelism, not a speed-up. On a
machine with several GPUs the same script measures one process per GPU.

    python benchmarks/ddp_scaling.py [--rounds 3] [--limit 12000] [--epochs 3]

One JSON line per measurement, then one summary line per process count.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cnnkit.device import describe, resolve_device
from cnnkit.models import create_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_images_per_s(nproc: int, device: str, args, workdir: Path) -> float:
    """Median images/s of the epochs after the first, of one `cnnkit train` run."""
    name = f"n{nproc}-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "cnnkit", "train", "--data", "mnist", "--model", args.model]
    argv += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    argv += ["--limit", str(args.limit), "--device", device, "--name", name, "--quiet"]
    argv += ["--runs-dir", str(workdir)]
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    with open(workdir / name / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return statistics.median(float(r["images_per_s"]) for r in rows[1:] or rows)


def _all_reduce_worker(rank: int, size: int, port: int, numel: int, calls: int, out) -> None:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= size
    backend = "nccl" if cuda else "gloo"
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    grads = torch.randn(numel, device=device)
    times = []
    for i in range(calls + 5):  # 5 warm-up calls
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dist.all_reduce(grads)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put((backend, statistics.median(times) * 1000, min(times) * 1000, max(times) * 1000))
    dist.destroy_process_group()


def all_reduce_ms(size: int, numel: int, calls: int) -> tuple[str, float, float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_all_reduce_worker, args=(r, size, port, numel, calls, queue))
        for r in range(size)
    ]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="seed-cnn")
    p.add_argument("--limit", type=int, default=12000, help="MNIST training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256, help="the global batch")
    p.add_argument("--calls", type=int, default=200, help="all-reduce calls timed")
    args = p.parse_args()

    device = resolve_device("auto")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    counts = [n for n in (1, 2, 4, 8) if n <= max(gpus, 2)] if gpus >= 2 else [1, 2]
    where = describe(device)
    model = create_model(args.model, 10, 1, (28, 28))
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)

    samples: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for n in counts:
                ips = train_images_per_s(n, device.type, args, Path(tmp))
                samples[n].append(ips)
                record = {"benchmark": "ddp-train", "processes": n, "round": round_}
                print(json.dumps({**record, "images_per_s": round(ips), "device": where}))
    one = statistics.median(samples[1])
    for n in counts:
        ips = statistics.median(samples[n])
        record = {"benchmark": "ddp-train-summary", "processes": n, "model": args.model}
        record |= {"global_batch": args.batch_size, "limit": args.limit, "rounds": args.rounds}
        record |= {
            "images_per_s_median": round(ips),
            "range": [round(min(samples[n])), round(max(samples[n]))],
        }
        record |= {"efficiency": round(ips / (n * one), 3), "device": where}
        print(json.dumps(record), flush=True)
    for n in counts[1:]:
        backend, median, low, high = all_reduce_ms(n, numel, args.calls)
        step_ms = args.batch_size / statistics.median(samples[n]) * 1000  # one training step
        record = {"benchmark": "ddp-all-reduce", "processes": n, "backend": backend}
        record |= {"numel": numel, "megabytes": round(numel * 4 / 2**20, 2)}
        record |= {"ms_median": round(median, 3), "ms_range": [round(low, 3), round(high, 3)]}
        record |= {
            "training_step_ms": round(step_ms, 2),
            "share_of_step": round(median / step_ms, 3),
        }
        print(json.dumps({**record, "calls": args.calls, "device": where}), flush=True)


if __name__ == "__main__":
    main()
