"""Streaming photos from tar shards vs the decode cache vs torchvision's ImageFolder: decoding
throughput at 224 px, and the streamed path's peak memory at two data-set sizes.

1. Throughput (images/s, and per worker process) of one pass over the cats-vs-dogs training
   photos ($CNNKIT_DATA/cats_vs_dogs/train, or cats_and_dogs_filtered/train: 1,600 JPEGs of
   about 500x375 in two class folders) decoded to uint8 3x224x224, by three paths, each with
   1 and 2 DataLoader workers:

   a. ``stream``: cnnkit's streaming from WebDataset shards. The folder is packed once,
      untimed, with ``cnnkit.data.pack.pack(src, out, max_count=--shard-samples,
      val_split=0, test_split=0)`` (the whole folder is the train split; small shards so
      that both workers get some: a worker reads every W-th shard, and at the default
      256 MB per shard the folder would be one shard that one worker reads alone). Timed:
      one ``stream_batches(StreamPlan(train split, 3, 224, seed=0, epoch=0), batch_size=64,
      workers=W)`` epoch: worker start-up, tar reading, decoding (Pillow's JPEG draft mode),
      the shuffle buffer and batching in the main process.
   b. ``decode-cache``: ``cnnkit.data.folder.decode_images(paths, 3, 224, workers=W)`` into
      a fresh cache (XDG_CACHE_HOME is a new empty folder for every measurement, so it
      really decodes): hashing the files for the cache key, decoding, writing the .npy and
      loading it. This is a one-off cost: every later epoch reads the decoded array in
      memory and decodes nothing, so its epochs are free as far as decoding goes (not
      timed here). ``decode_seconds`` is the decoding part alone.
   c. ``imagefolder``: the plain peer, ``torchvision.datasets.ImageFolder(root,
      transform=Compose([Resize(224), CenterCrop(224), PILToTensor()]))`` with
      ``DataLoader(batch_size=64, num_workers=W)``, one pass. It decodes every JPEG at
      full size (no draft mode) and resizes bilinearly with antialiasing; cnnkit resizes
      bicubically, so the pixels differ slightly but the work is alike.

   The rounds are interleaved (a, b, c, a, b, c, ...) so that a slow spell of the shared
   machine hits every path alike; the summary gives the median and range per (path,
   workers). Every file and shard is read once before the first round, so all rounds read
   from the page cache. DataLoader sets torch to one thread in each worker. On a 2-core
   machine 2 workers compete with the main process (which receives, concatenates or
   collates the batches), so 2 workers are not expected to be twice as fast as 1;
   "per worker" is images/s divided by the worker processes.

2. Memory. The claim to check: the streamed path's peak memory does not grow with the data
   set (each worker holds at most SHUFFLE_BUFFER samples plus its prefetched chunks; the
   decode cache, by contrast, holds N x 3 x 224 x 224 bytes in memory, given here computed,
   not allocated). Two shard sets of 2,000 and --big (50,000) samples are written directly
   as tars in the packer's layout ({split}-{position:08d}.cls/.jpg/.json members, a
   matching index.json) by repeating the packed photos under new keys. A child process
   streams each once at 64 px (to keep it fast) with 1 worker and reports its own peak RSS
   (VmHWM) and its worker's (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` once the worker has
   been joined). The worker is forked, so its RSS counts the pages it shares with the main
   process: do not add the two.

One JSON line per measurement, then summary lines; a table on stderr. Never fails on timing.

    python benchmarks/stream_pipeline.py [--rounds 3] [--workers 1,2] [--big 50000]
        [--skip-memory] [--limit N] [--data PATH] [--shard-samples 100]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cnnkit.device import describe

SIZE = 224
BATCH = 64
SMALL = 2000  # samples of the smaller memory set
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
PATHS = ("stream", "decode-cache", "imagefolder")


def emit(kind: str, **fields) -> None:
    print(json.dumps({"benchmark": kind, **fields}), flush=True)


def default_folder() -> Path:
    for root in os.environ.get("CNNKIT_DATA", "").split(os.pathsep):
        for name in ("cats_and_dogs_filtered", "cats_vs_dogs"):
            if root and (Path(root) / name / "train").is_dir():
                return Path(root) / name / "train"
    raise SystemExit("pass --data PATH (no cats_vs_dogs/train in CNNKIT_DATA)")


def photos(folder: Path) -> dict[str, list[Path]]:
    """{class: its image files, sorted} of a folder of class folders."""
    return {
        d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        for d in sorted(folder.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def limited_copy(folder: Path, limit: int, out: Path) -> Path:
    """The first ``limit`` photos, taken from the classes in turn, copied to ``out``."""
    classes = photos(folder)
    queues = {c: list(files) for c, files in classes.items()}
    taken = 0
    while taken < limit and any(queues.values()):
        for c, queue in queues.items():
            if queue and taken < limit:
                (out / c).mkdir(parents=True, exist_ok=True)
                f = queue.pop(0)
                shutil.copyfile(f, out / c / f.name)
                taken += 1
    return out


def read_all(files: list[Path]) -> None:
    """Into the page cache, so that no round pays for the disk."""
    for f in files:
        f.read_bytes()


# ---------------------------------------------------------------- the three paths


def time_stream(shard_dir: Path, workers: int) -> dict:
    from cnnkit.data.shards import read_shard_set
    from cnnkit.data.stream import StreamPlan, stream_batches

    split = read_shard_set(str(shard_dir)).splits["train"]
    plan = StreamPlan(split, channels=3, size=SIZE, seed=0, epoch=0)
    n = 0
    t0 = time.perf_counter()
    for images, _ in stream_batches(plan, batch_size=BATCH, workers=workers):
        n += len(images)
    return {"images": n, "seconds": time.perf_counter() - t0}


def time_decode_cache(files: list[Path], workers: int, cache_home: Path) -> dict:
    """decode_images into an empty cache: the whole call, and its decoding part."""
    from cnnkit.data.folder import decode_images

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache_home)  # empty: a cold cache
    try:
        t0 = time.perf_counter()
        decoded = decode_images(files, 3, SIZE, workers=workers)
        seconds = time.perf_counter() - t0
        if decoded.from_cache:
            raise RuntimeError(f"{cache_home}: the decode cache was not empty")
        result = {"images": len(decoded.kept), "seconds": seconds}
        result["decode_seconds"] = decoded.seconds
        del decoded
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old
        shutil.rmtree(cache_home, ignore_errors=True)
    return result


def time_imagefolder(folder: Path, workers: int) -> dict:
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.PILToTensor()]
    )
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers)
    n = 0
    t0 = time.perf_counter()
    for images, _ in loader:
        n += len(images)
    return {"images": n, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- memory


def sample_members(shard_dir: Path) -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """Every sample of the packed train split: its tar members (header, data), in order."""
    index = json.loads((shard_dir / "index.json").read_text())
    samples: list[list[tuple[tarfile.TarInfo, bytes]]] = []
    for shard in index["splits"]["train"]["shards"]:
        key = None
        with tarfile.open(shard_dir / shard["name"]) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k = info.name.rpartition("/")[2].partition(".")[0]
                if k != key:
                    samples.append([])
                    key = k
                samples[-1].append((info, tar.extractfile(info).read()))
    return samples


def write_repeated(shard_dir: Path, out: Path, total: int, per_shard: int) -> int:
    """A shard set of ``total`` train samples in ``out``: the packed samples repeated under
    new keys, tars of ``per_shard`` samples, index.json last. Returns its bytes."""
    index = json.loads((shard_dir / "index.json").read_text())
    samples = sample_members(shard_dir)
    out.mkdir(parents=True)
    shards, class_counts = [], [0] * len(index["classes"])
    for first in range(0, total, per_shard):
        name = f"train-{len(shards):06d}.tar"
        count = min(per_shard, total - first)
        with tarfile.open(out / name, "w") as tar:
            for position in range(first, first + count):
                key = f"train-{position:08d}"
                for info, data in samples[position % len(samples)]:
                    ext = info.name.rpartition("/")[2].partition(".")[2]
                    new = copy.copy(info)
                    new.name = f"{key}.{ext}"
                    tar.addfile(new, io.BytesIO(data))
                    if ext == "cls":
                        class_counts[int(data)] += 1
        shards.append({"name": name, "count": count, "bytes": (out / name).stat().st_size})
    repeated = {
        **index,
        "source": f"{index['source']} (repeated to {total} samples by stream_pipeline.py)",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "val_split": 0.0,
        "test_split": 0.0,
        "splits": {"train": {"count": total, "class_counts": class_counts, "shards": shards}},
        "skipped": [],
    }
    (out / "index.json").write_text(json.dumps(repeated, indent=1))
    return sum(s["bytes"] for s in shards)


def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_child(shard_dir: str, size: int, workers: int) -> None:
    """Run in a child process: stream the set once, print the peaks as one JSON line."""
    import gc

    from cnnkit.data.shards import read_shard_set
    from cnnkit.data.stream import StreamPlan, stream_batches

    baseline = _vm("VmRSS")
    split = read_shard_set(shard_dir).splits["train"]
    plan = StreamPlan(split, channels=3, size=size, seed=0, epoch=0)
    n = 0
    t0 = time.perf_counter()
    for images, _ in stream_batches(plan, batch_size=BATCH, workers=workers):
        n += len(images)
    seconds = time.perf_counter() - t0
    gc.collect()  # the loader is done: its workers have been joined (and so reaped)
    kb = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KiB on Linux, bytes on macOS
    self_peak = _vm("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb
    result = {"images": n, "seconds": seconds, "main_baseline_bytes": baseline}
    result |= {"main_peak_bytes": self_peak, "worker_peak_bytes": worker_peak}
    print(json.dumps(result), flush=True)


def measure_memory(shard_dir: Path, size: int, workers: int) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--memory-child", str(shard_dir)]
    argv += ["--memory-size", str(size), "--workers", str(workers)]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def mb(n: float) -> float:
    return round(n / 2**20, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default="1,2", help="DataLoader workers, comma-separated")
    p.add_argument("--big", type=int, default=50_000, help="samples of the larger memory set")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="only the first N photos (smoke)")
    p.add_argument("--data", default=None, help="a folder of class folders of photos")
    p.add_argument("--shard-samples", type=int, default=100, help="samples per shard")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-size", type=int, default=64, help=argparse.SUPPRESS)
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.memory_child:
        memory_child(args.memory_child, args.memory_size, workers[0])
        return

    from cnnkit.data.pack import pack
    from cnnkit.data.stream import SHUFFLE_BUFFER

    data = Path(args.data) if args.data else default_folder()
    where = describe(torch.device("cpu"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    samples: dict[tuple[str, int], list[float]] = {(p, w): [] for p in PATHS for w in workers}
    counts: dict[tuple[str, int], int] = {}
    table: list[str] = []

    with tempfile.TemporaryDirectory(prefix="stream-pipeline-") as tmp_name:
        tmp = Path(tmp_name)
        src = limited_copy(data, args.limit, tmp / "src") if args.limit else data
        files = [f for fs in photos(src).values() for f in fs]
        shard_dir = tmp / "shards"
        t0 = time.perf_counter()
        packed = pack(
            str(src), shard_dir, max_count=args.shard_samples, val_split=0.0, test_split=0.0
        )
        train = packed["splits"]["train"]
        emit(
            "stream-pipeline-setup",
            step="pack (once, untimed in the comparison)",
            source=str(data),
            photos=len(files),
            packed=train["count"],
            shards=len(train["shards"]),
            shard_samples=args.shard_samples,
            megabytes=mb(packed["bytes"]),
            seconds=round(time.perf_counter() - t0, 2),
            device=where,
            cores=cores,
        )
        read_all(files + sorted(shard_dir.glob("*.tar")))

        # ------------------------------------------------------------ 1. throughput
        measurement = 0
        for round_ in range(args.rounds):
            for path in PATHS:
                for w in workers:
                    measurement += 1
                    if path == "stream":
                        r = time_stream(shard_dir, w)
                    elif path == "decode-cache":
                        r = time_decode_cache(files, w, tmp / f"cache-{measurement}")
                    else:
                        r = time_imagefolder(src, w)
                    ips = r["images"] / r["seconds"]
                    samples[(path, w)].append(ips)
                    counts[(path, w)] = r["images"]
                    record = {"path": path, "workers": w, "round": round_, "size": SIZE}
                    record |= {
                        k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                    }
                    record |= {
                        "images_per_s": round(ips, 1),
                        "images_per_s_per_worker": round(ips / max(w, 1), 1),
                        "device": where,
                    }
                    emit("stream-pipeline", **record)

        table.append(f"decoding to 3x{SIZE}x{SIZE}, {len(files)} photos, {args.rounds} round(s)")
        table.append(
            f"{'path':<14}{'workers':>8}{'img/s median':>14}{'range':>16}{'per worker':>12}"
        )
        for path in PATHS:
            for w in workers:
                s = samples[(path, w)]
                med = statistics.median(s)
                record = {"path": path, "workers": w, "size": SIZE, "images": counts[(path, w)]}
                record |= {"rounds": args.rounds, "images_per_s_median": round(med, 1)}
                record |= {"range": [round(min(s), 1), round(max(s), 1)]}
                record |= {"images_per_s_per_worker": round(med / max(w, 1), 1)}
                if path == "decode-cache":
                    record["note"] = (
                        "one-off: later epochs read the decoded array in memory (not timed)"
                    )
                record["device"] = where
                emit("stream-pipeline-summary", **record)
                span = f"{min(s):.0f}-{max(s):.0f}"
                table.append(f"{path:<14}{w:>8}{med:>14.0f}{span:>16}{med / max(w, 1):>12.0f}")
        table.append("decode-cache: a one-off cost; its epochs after that decode nothing")

        # ------------------------------------------------------------ 2. memory
        if not args.skip_memory:
            size, w = 64, 1
            peaks = {}
            table.append("")
            table.append(f"streaming at {size} px, {w} worker: peak RSS (MiB)")
            table.append(
                f"{'samples':>8}{'main':>8}{'worker':>8}{'img/s':>8}{'decode cache @224 (MiB)':>26}"
            )
            for total in sorted({SMALL, args.big}):
                big_dir = tmp / f"repeated-{total}"
                made = write_repeated(shard_dir, big_dir, total, args.shard_samples)
                r = measure_memory(big_dir, size, w)
                in_memory = total * 3 * SIZE * SIZE
                peaks[total] = r
                emit(
                    "stream-pipeline-memory",
                    samples=total,
                    streamed=r["images"],
                    size=size,
                    workers=w,
                    shard_megabytes=mb(made),
                    seconds=round(r["seconds"], 2),
                    images_per_s=round(r["images"] / r["seconds"], 1),
                    main_baseline_mb=mb(r["main_baseline_bytes"]),
                    main_peak_mb=mb(r["main_peak_bytes"]),
                    worker_peak_mb=mb(r["worker_peak_bytes"]),
                    shuffle_buffer_mb=mb(SHUFFLE_BUFFER * 3 * size * size),
                    decode_cache_in_memory_mb_at_224=mb(in_memory),
                    device=where,
                )
                table.append(
                    f"{total:>8}{mb(r['main_peak_bytes']):>8.0f}{mb(r['worker_peak_bytes']):>8.0f}"
                    f"{r['images'] / r['seconds']:>8.0f}{mb(in_memory):>26.0f}"
                )
                shutil.rmtree(big_dir, ignore_errors=True)
            if len(peaks) == 2:
                small, big = (peaks[k] for k in sorted(peaks))
                emit(
                    "stream-pipeline-memory-summary",
                    samples=sorted(peaks),
                    main_peak_growth=round(big["main_peak_bytes"] / small["main_peak_bytes"], 3),
                    worker_peak_growth=round(
                        big["worker_peak_bytes"] / max(small["worker_peak_bytes"], 1), 3
                    ),
                    data_growth=round(max(peaks) / min(peaks), 1),
                )

    print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
    main()
