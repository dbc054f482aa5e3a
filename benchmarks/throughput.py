"""Training throughput (images/s) of seed-cnn and ResNet-20 against batch size and image
size, on random data (the data path is not what is measured here), with the training
loop's defaults: channels_last, fused Adam and the default precision (bf16 autocast where
the CPU has it natively; ``--precision fp32`` to compare). One JSON line per point; each
point runs about 2 s after a warm-up step.

    python benchmarks/throughput.py [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from cnnkit.device import autocast, resolve_precision, tune_allocator, use_channels_last
from cnnkit.models import create_model


def images_per_s(name: str, size: int, batch: int, dtype: torch.dtype, seconds=2.0) -> float:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = create_model(name, 10, 3, (size, size))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3, fused=True)
    fmt = torch.channels_last if use_channels_last(model, cpu) else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step():
        with autocast(cpu, dtype):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: oneDNN picks its kernels
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        step()
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = p.parse_args()
    tune_allocator()
    dtype = resolve_precision(args.precision, torch.device("cpu"))
    for name in ("seed-cnn", "resnet20"):
        for size in (28, 32, 64, 224):
            for batch in (32, 128, 512):
                if size == 224 and batch > 128:
                    continue  # minutes per step on 2 cores: not worth measuring
                speed = images_per_s(name, size, batch, dtype)
                record = {
                    "benchmark": "train-throughput",
                    "model": name,
                    "image_size": size,
                    "batch_size": batch,
                    "channels": 3,
                    "precision": str(dtype).removeprefix("torch."),
                    "images_per_s": round(speed, 1),
                }
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
