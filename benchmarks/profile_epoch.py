"""Where the time goes in the tutorial recipe on a CPU: torch.profiler over 500 training
steps of seed-cnn on MNIST (batch 32, Adam 1e-3, the default precision: bf16 autocast where
the CPU has it natively), after a warm-up run.

    python benchmarks/profile_epoch.py [--precision fp32]
"""

from __future__ import annotations

import argparse
import tempfile

from torch.profiler import ProfilerActivity, profile

import cnnkit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        settings = dict(
            precision=args.precision,
            data="mnist",
            model="seed-cnn",
            epochs=1,
            batch_size=32,
            val_split=0.02,
            runs_dir=runs,
            quiet=True,
        )
        cnnkit.train(limit=3200, **settings)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run = cnnkit.train(limit=16000, **settings)
        row = run.history[0]
    print(
        f"500 steps: {row['seconds']:.2f} s under the profiler "
        f"({row['seconds'] / 500 * 1000:.2f} ms/step)"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
