"""How far two CPU cores can take the tutorial CNN's training step, and how far they do.

Times float32 seed-cnn training steps (as benchmarks/step_costs.py builds them) in separate
processes, so that each has its own thread settings:

- batch 32 on two threads: what training does (threads inside each kernel);
- batch 32 and batch 16 on one thread;
- two processes at once, one thread each, each stepping batch 16: the two halves of a
  batch of 32 on their own cores, with no gradient exchange. Their step time is a floor
  for data parallelism over the two cores, which would add the exchange.

One JSON line per setting: median and range of per-step microseconds over the rounds.

    python benchmarks/core_scaling.py [--rounds 5] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from cnnkit.device import tune_allocator

sys.path.insert(0, str(Path(__file__).parent))
from step_costs import Variant, step_spread  # noqa: E402  (a sibling script)


def child(threads: int, batch: int, rounds: int, steps: int) -> None:
    torch.set_num_threads(threads)
    tune_allocator()
    variant = Variant(batch, torch.float32)
    print(json.dumps([variant.time_us(steps) for _ in range(rounds)]), flush=True)


def spawn(threads: int, batch: int, args) -> subprocess.Popen:
    argv = [sys.executable, __file__, "--child", f"{threads},{batch}"]
    argv += ["--rounds", str(args.rounds), "--steps", str(args.steps)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def report(name: str, times: list[float], args) -> None:
    record = {"benchmark": "core-scaling", "setting": name, **step_spread(times)}
    print(json.dumps({**record, "rounds": args.rounds, "steps": args.steps}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        threads, batch = map(int, args.child.split(","))
        child(threads, batch, args.rounds, args.steps)
        return
    for name, threads, batch in [
        ("batch 32, two threads", 2, 32),
        ("batch 32, one thread", 1, 32),
        ("batch 16, one thread", 1, 16),
    ]:
        out, _ = spawn(threads, batch, args).communicate()
        report(name, json.loads(out), args)
    pair = [spawn(1, 16, args), spawn(1, 16, args)]
    for i, proc in enumerate(pair):
        out, _ = proc.communicate()
        name = f"batch 16, one thread, two processes at once (process {i + 1})"
        report(name, json.loads(out), args)


if __name__ == "__main__":
    main()
