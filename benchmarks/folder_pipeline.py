"""Throughput of the photo pipeline on a folder data set (default: cats_vs_dogs in
$CNNKIT_DATA): decoding into the cache (worker processes), loading from the cache, and
training images/s with the decoded images in memory vs read from the memory-mapped cache.

Prints one JSON line per measurement. Never fails on timing.

    python benchmarks/folder_pipeline.py [--data PATH] [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cnnkit
from cnnkit.data import load_folder


def default_folder() -> str:
    for root in os.environ.get("CNNKIT_DATA", "").split(os.pathsep):
        if root and (Path(root) / "cats_vs_dogs").is_dir():
            return str(Path(root) / "cats_vs_dogs")
    raise SystemExit("pass --data PATH (no cats_vs_dogs in CNNKIT_DATA)")


def emit(**fields) -> None:
    print(json.dumps({"benchmark": "folder-pipeline", **fields}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--model", default="seed-cnn")
    args = p.parse_args()
    folder = args.data or default_folder()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = tmp  # a cold cache
        t0 = time.perf_counter()
        data = load_folder(folder, image_size=args.image_size, val_split=0.1, test_split=0.1)
        n = sum(len(s) for s in (data.train, data.val, data.test) if s is not None)
        cold = time.perf_counter() - t0
        emit(
            step="decode (cold cache)",
            images=n,
            seconds=round(cold, 2),
            images_per_s=round(n / cold),
            workers=os.cpu_count(),
        )
        t0 = time.perf_counter()
        load_folder(folder, image_size=args.image_size, val_split=0.1, test_split=0.1)
        emit(step="load (warm cache)", images=n, seconds=round(time.perf_counter() - t0, 2))

        for where, budget in (("in memory", None), ("memory-mapped", "1")):
            if budget:
                os.environ["CNNKIT_MEMORY_BUDGET"] = budget
            run = cnnkit.train(
                data=folder,
                model=args.model,
                image_size=args.image_size,
                epochs=2,
                augment="photo",
                runs_dir=tmp,
                quiet=True,
            )
            os.environ.pop("CNNKIT_MEMORY_BUDGET", None)
            last = run.history[-1]  # the second epoch: the page cache is warm for both
            emit(
                step=f"train {args.model} {args.image_size}px, images {where}",
                images_per_s=round(last["images_per_s"]),
                seconds_per_epoch=round(last["seconds"], 2),
            )


if __name__ == "__main__":
    main()
