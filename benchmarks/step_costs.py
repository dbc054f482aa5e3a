"""What one training step of the tutorial CNN costs on this CPU, and what its parts cost.

Times seed-cnn training steps (Adam, channels_last, random 28x28x1 batches) in interleaved
rounds, so that a slow spell of a shared machine hits every variant alike, and prints one
JSON line per variant with the median and the range over rounds:

- float32 and bf16 autocast at batch 32, and at batch 1, where the step is nearly all
  fixed cost (dispatch, autocast casts, autograd, optimizer);
- max pooling before the ReLU (what layer specs build) against the tutorial's ReLU then
  pooling: the same function, a different cost;
- bf16 weights kept between steps, with float32 master weights in the optimizer, instead
  of autocast casting the weights at every step;
- with ``--compile``, the model under torch.compile too (compilation time reported apart).

    python benchmarks/step_costs.py [--rounds 8] [--steps 300] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.device import tune_allocator


def seed_cnn(pool_first: bool) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        conv, relu, pool = nn.Conv2d(cin, cout, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        return [conv, pool, relu] if pool_first else [conv, relu, pool]

    layers = [*block(1, 32), *block(32, 64), nn.Flatten(), nn.Linear(1600, 64)]
    layers += [nn.ReLU(inplace=True), nn.Linear(64, 10)]
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


class Variant:
    def __init__(self, batch: int, dtype: torch.dtype, pool_first=True, compiled=False):
        torch.manual_seed(0)
        self.dtype, self.batch = dtype, batch
        self.build(pool_first, compiled)
        self.images = torch.randn(4096, 1, 28, 28)
        self.labels = torch.randint(0, 10, (4096,))
        self.offset = 0
        t0 = time.perf_counter()
        self.step()  # warm-up: kernel selection, compilation
        self.first_step_s = time.perf_counter() - t0
        for _ in range(50):
            self.step()

    def build(self, pool_first: bool, compiled: bool) -> None:
        self.model = seed_cnn(pool_first)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), 1e-3, fused=True)

    def batch_xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.offset
        self.offset = (i + self.batch) % (len(self.images) - self.batch)
        return self.images[i : i + self.batch], self.labels[i : i + self.batch]

    def step(self) -> None:
        x, y = self.batch_xy()
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = F.cross_entropy(self.forward(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def time_us(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - t0) / steps * 1e6


class MasterWeights(Variant):
    """The model's weights in bf16 between steps; the optimizer updates float32 copies."""

    def __init__(self, batch: int):
        super().__init__(batch, torch.bfloat16)

    def build(self, pool_first: bool, compiled: bool) -> None:
        model = seed_cnn(pool_first)
        self.master = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        self.model = model.to(torch.bfloat16)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.Adam(self.master, 1e-3, fused=True)

    def step(self) -> None:
        x, y = self.batch_xy()
        loss = F.cross_entropy(self.model(x.to(torch.bfloat16)).float(), y)
        for p in self.params:
            p.grad = None
        loss.backward()
        for m, p in zip(self.master, self.params, strict=True):
            m.grad = p.grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params, strict=True):
                p.copy_(m)


def step_spread(times_us: list[float]) -> dict:
    """Median and range of per-step microseconds over the rounds."""
    return {
        "us_per_step_median": round(statistics.median(times_us)),
        "us_per_step_min": round(min(times_us)),
        "us_per_step_max": round(max(times_us)),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    tune_allocator()
    f32, bf16 = torch.float32, torch.bfloat16
    variants = {
        "batch 32 fp32": Variant(32, f32),
        "batch 32 bf16": Variant(32, bf16),
        "batch 32 bf16, ReLU before pooling": Variant(32, bf16, pool_first=False),
        "batch 32 bf16 weights, float32 master weights": MasterWeights(32),
        "batch 1 fp32": Variant(1, f32),
        "batch 1 bf16": Variant(1, bf16),
        "batch 1 bf16 weights, float32 master weights": MasterWeights(1),
    }
    if args.compile:
        variants["batch 32 fp32 compiled"] = Variant(32, f32, compiled=True)
        variants["batch 32 bf16 compiled"] = Variant(32, bf16, compiled=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            times[name].append(v.time_us(args.steps))
    for name, t in times.items():
        record = {"benchmark": "step-cost", "variant": name, **step_spread(t)}
        record["first_step_s"] = round(variants[name].first_step_s, 2)
        print(json.dumps({**record, "rounds": args.rounds, "steps": args.steps}), flush=True)


if __name__ == "__main__":
    main()
