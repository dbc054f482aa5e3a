"""Exported models on this machine: file size, load time and one-image latency of every
format cnnkit exports, and the accuracy that int8 quantisation costs, for two models.

Models (trained here, untimed, unless --run-mnist / --run-cats name existing run folders):

- ``seed-cnn/mnist``: ``cnnkit.train(data="mnist", model="seed-cnn", epochs=1,
  limit=--mnist-limit)``: 1x28x28 grey digits, 10 classes.
- ``efficientnet_lite0/cats_vs_dogs``: ImageNet weights with a new head trained on
  $CNNKIT_DATA/cats_vs_dogs (``pretrained=True, image_size=--cats-size, limit=--cats-limit,
  epochs=3, finetune_epochs=--cats-finetune-epochs``): 3x224x224 colour photos, 2 classes.
  Kept cheap on purpose (the point is the exported file's speed, not its accuracy): by
  default the head alone trains, on backbone features computed once (200 training + the
  400 validation photos at 224 px: estimated at 1-2 minutes on 2 cores; an epoch of
  fine-tuning costs minutes more there and changes no latency). The weights are the same
  architecture and size either way; the int8 accuracy change is that of a frozen ImageNet
  backbone with a trained head.

Formats, each through cnnkit's own export and runtime code, on the CPU:

- ``pytorch``: the run's model wrapped as the exports are (``ImagesToProbabilities``: uint8
  in, normalisation inside, probabilities out), under ``torch.no_grad()``, torch's
  default intra-op threads. Size: its state_dict saved alone (best.pt also holds the
  training state). Load: ``cnnkit.load(run_dir, device="cpu")`` (reads the checkpoint and
  builds the model).
- ``onnx`` fp32 / int8: ``export_onnx(run, path, quantize="int8")`` (ONNX Runtime static
  QDQ quantisation, calibrated on training images).
- ``ort`` fp32 / int8 (ONNX Runtime's mobile format), ``executorch`` fp32 / int8 (.pte,
  XNNPACK), ``coreml`` fp32 / int8 weights (.mlpackage): ``export_mobile(run, fmt, path,
  quantize="int8")``. Core ML predicts on Apple systems only: size alone here.
  Load and latency of .onnx/.ort/.pte: ``cnnkit.deploy.mobile.runtime_predictor(path)``
  (ONNX Runtime's InferenceSession with its default threads, or ExecuTorch's Runtime);
  load time is that call.
- ``browser`` fp32 / int8: ``export_webapp(run, dir)`` served on 127.0.0.1 by http.server
  and opened in Debian's Chromium (/usr/bin/chromium, headless, through playwright). The
  page's own session is private to app.js, so once the page is ready this script imports
  the same vendored ONNX Runtime Web bundle in the page and creates sessions as app.js
  does (wasm, numThreads=1, no proxy, graphOptimizationLevel "all", the model by URL; the
  int8 file is export_onnx's, copied into the folder). Load: ``InferenceSession.create``
  (the median of the creations after the first; the first, whose fetch of the file is not
  yet in the HTTP cache, is ``first_load_s``; the WebAssembly runtime itself was already
  started by the page's own app.js, which imports the same module); latency:
  ``performance.now()`` around ``session.run`` (the input tensor made once), which
  Chromium rounds to 0.1 ms.

Latency: one image (the first validation image, uint8 at the model's input size), three
warm-up calls, then up to --runs calls or --seconds, whichever ends first: median and 90th
percentile in ms. Load: median of --loads. Int8 accuracy change: percentage points of
top-1 accuracy, int8 minus fp32, on the first --check-images validation images, as each
export measures and reports it (``result.int8``); Core ML's is not measured on Linux.

One JSON line per measurement (stdout), then a table on stderr. Never fails on timing: a
format that cannot be exported or run here gives a line with its ``error``.

    CNNKIT_DATA=/path/to/data python benchmarks/device_export.py [--quick]
        [--run-mnist DIR] [--run-cats DIR] [--models mnist,cats] [--runs 100]
        [--seconds 20] [--loads 5] [--check-images 500] [--cats-size 224]
        [--cats-limit 200] [--cats-finetune-epochs 0] [--mnist-limit 6000] [--no-browser]
        [--keep DIR] [--verbose]

--quick: a smoke test (small training sets, cats at 96 px, 10 runs or 2 s, 2 loads, 64
check images and 32 calibration images): about 1.5 min for MNIST and 3 min for cats on 2
cores, most of it exporting (ExecuTorch lowering and checking above all), not measuring.
The full run was estimated, not tried: roughly 10 to 20 minutes on 2 cores. ONNX Runtime
Web must be in cnnkit's cache (``python -m cnnkit.deploy.webapp --fetch-runtime``) or
$CNNKIT_ORT_WEB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from cnnkit.device import describe

CHROMIUM = Path("/usr/bin/chromium")
MOBILE = ("ort", "executorch", "coreml")
WARMUP = 3


def emit(**fields) -> dict:
    record = {"benchmark": "device-export", **fields}
    print(json.dumps(record), flush=True)
    return record


def cpu_model() -> str:
    """lscpu's model name (and the CPU count), else /proc/cpuinfo's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_simd() -> str:
    """The widest x86 vector extension the CPU flags show (the kernels depend on it)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in text.splitlines()
            if line.startswith(("flags", "Features"))
        ),
        [],
    )
    for flag, name in (
        ("avx512_vnni", "AVX-512 VNNI"),
        ("avx512f", "AVX-512"),
        ("avx_vnni", "AVX-VNNI"),
        ("avx2", "AVX2"),
        ("asimd", "NEON"),
    ):
        if flag in flags:
            return name
    return "none of AVX2/AVX-512/NEON"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in (
        "cnnkit",
        "torch",
        "onnxruntime",
        "executorch",
        "coremltools",
        "numpy",
        "playwright",
    ):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def file_size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def stats_ms(times: list[float]) -> dict:
    return {
        "latency_median_ms": round(float(np.median(times)), 4),
        "latency_p90_ms": round(float(np.percentile(times, 90)), 4),
        "latency_runs": len(times),
    }


def time_calls(predict, image: np.ndarray, runs: int, seconds: float) -> dict:
    """Three warm-up calls, then up to ``runs`` calls or ``seconds``, whichever ends first."""
    for _ in range(WARMUP):
        predict(image)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < runs and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        predict(image)
        times.append((time.perf_counter() - t0) * 1000)
    return stats_ms(times)


def time_load(load, repeats: int):
    """Median seconds of ``load()`` over ``repeats`` calls, and the last thing loaded."""
    seconds, loaded = [], None
    for _ in range(repeats):
        loaded = None  # the previous session freed before the next is made
        t0 = time.perf_counter()
        loaded = load()
        seconds.append(time.perf_counter() - t0)
    return round(statistics.median(seconds), 4), loaded


def int8_fields(int8: dict | None) -> dict:
    if not int8:
        return {}
    fields = {
        k: int8[k]
        for k in ("images", "accuracy_fp32", "accuracy_int8", "top1_agreement_with_fp32")
        if k in int8
    }
    if "accuracy_change_points" in int8:
        fields["int8_accuracy_change_points"] = round(int8["accuracy_change_points"], 3)
    elif "accuracy" in int8:
        fields["int8_accuracy_change_points"] = None
        fields["note"] = int8["accuracy"]
    return fields


# ---------------------------------------------------------------- the runs


def cats_folder() -> Path:
    for root in os.environ.get("CNNKIT_DATA", "").split(os.pathsep):
        if root and (Path(root) / "cats_vs_dogs" / "train").is_dir():
            return Path(root) / "cats_vs_dogs"
    raise SystemExit("no cats_vs_dogs/train in CNNKIT_DATA: set it, or pass --run-cats DIR")


def get_run(name: str, args, runs_dir: Path):
    """(the Run, seconds it took to train or None when reused, what was trained)."""
    import cnnkit

    given = args.run_mnist if name == "mnist" else args.run_cats
    if given:
        return cnnkit.load(given, device="cpu"), None, {"run": str(given)}
    if name == "mnist":
        settings = {"data": "mnist", "model": "seed-cnn", "epochs": 1, "limit": args.mnist_limit}
    else:
        settings = {
            "data": str(cats_folder()),
            "model": "efficientnet_lite0",
            "pretrained": True,
            "image_size": args.cats_size,
            "limit": args.cats_limit,
            "epochs": args.cats_epochs,
            "finetune_epochs": args.cats_finetune_epochs,
        }
    t0 = time.perf_counter()
    run = cnnkit.train(**settings, device="cpu", runs_dir=str(runs_dir), quiet=True)
    seconds = time.perf_counter() - t0
    return cnnkit.load(run.path, device="cpu"), seconds, settings


def model_name(run) -> str:
    data = Path(run.config.data.name).name
    return f"{run.config.model.name}/{data}"


# ---------------------------------------------------------------- Python runtimes


def measure_pytorch(run, image: np.ndarray, work: Path, args) -> dict:
    import cnnkit
    from cnnkit.deploy.export import images_to_probabilities

    wrapper = images_to_probabilities(run)
    weights = work / "state_dict.pt"
    torch.save(wrapper.state_dict(), weights)
    load_s, _ = time_load(lambda: cnnkit.load(run.path, device="cpu"), args.loads)
    x = torch.from_numpy(image)

    def predict(_):
        with torch.no_grad():
            return wrapper(x)

    return {
        "size_bytes": file_size(weights),
        "load_s": load_s,
        **time_calls(predict, image, args.runs, args.seconds),
        "threads": torch.get_num_threads(),
    }


def measure_file(path: Path, image: np.ndarray, args) -> dict:
    from cnnkit.deploy.mobile import runtime_predictor

    load_s, predict = time_load(lambda: runtime_predictor(path), args.loads)
    return {
        "size_bytes": file_size(path),
        "load_s": load_s,
        **time_calls(predict, image, args.runs, args.seconds),
    }


# ---------------------------------------------------------------- the browser


# Runs in the page (page.evaluate is not held to the page's CSP). The same bundle, env and
# session options as app.js's load(); session.run timed as app.js's classify() does.
BROWSER_JS = """
async ({files, pixels, shape, runs, seconds, loads, warmup}) => {
  const ort = await import(new URL("ort/ort.wasm.bundle.min.js", location.href).href);
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.proxy = false;
  ort.env.wasm.wasmPaths = {
    wasm: new URL("ort/ort-wasm-simd-threaded.wasm", location.href).href };
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  const input = new ort.Tensor("uint8", Uint8Array.from(pixels), shape);
  const out = {};
  for (const file of files) {
    const create = [];
    let session = null;
    for (let i = 0; i < loads; i++) {
      if (session) await session.release();
      const t0 = performance.now();
      session = await ort.InferenceSession.create(file, options);
      create.push(performance.now() - t0);
    }
    const feeds = { [session.inputNames[0]]: input };
    for (let i = 0; i < warmup; i++) await session.run(feeds);
    const times = [];
    const deadline = performance.now() + 1000 * seconds;
    while (times.length < runs && performance.now() < deadline) {
      const t0 = performance.now();
      await session.run(feeds);
      times.push(performance.now() - t0);
    }
    await session.release();
    out[file] = { create, times };
  }
  return { results: out, userAgent: navigator.userAgent };
}
"""


def measure_browser(run, image: np.ndarray, onnx_int8: Path | None, work: Path, args):
    """{precision: fields} for the web app's model in Chromium (fp32, and int8 if given)."""
    from playwright.sync_api import sync_playwright

    from cnnkit.deploy.webapp import StaticServer, export_webapp

    app = work / "webapp"
    result = export_webapp(run, app, check_images=args.check_images)
    files = {"fp32": "model.onnx"}
    if onnx_int8 is not None and onnx_int8.is_file():
        shutil.copy(onnx_int8, app / "model-int8.onnx")
        files["int8"] = "model-int8.onnx"
    if not CHROMIUM.exists():
        raise RuntimeError(f"no {CHROMIUM}")
    with StaticServer(app) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url)
            deadline = time.time() + 120
            while page.evaluate("document.body.dataset.state") != "ready":
                if page.evaluate("document.body.dataset.state") == "failed" or (
                    time.time() > deadline
                ):
                    raise RuntimeError("the web app did not load: " + page.inner_text("#error"))
                time.sleep(0.1)
            reply = page.evaluate(
                BROWSER_JS,
                {
                    "files": list(files.values()),
                    "pixels": image.reshape(-1).tolist(),
                    "shape": list(image.shape),
                    "runs": args.runs,
                    "seconds": args.seconds,
                    "loads": args.loads + 1,  # the first is reported apart
                    "warmup": WARMUP,
                },
            )
            version = browser.version
        finally:
            browser.close()
    out = {}
    for precision, name in files.items():
        r = reply["results"][name]
        out[precision] = {
            "size_bytes": file_size(app / name),
            "load_s": round(statistics.median(r["create"][1:]) / 1000, 4),
            "first_load_s": round(r["create"][0] / 1000, 4),
            **stats_ms(r["times"]),
            "browser": f"Chromium {version}",
            "ort_web": result.ort_web,
            "threads": 1,
        }
    return out


# ---------------------------------------------------------------- one model


def measure_model(name: str, args, work: Path, cpu: str) -> list[dict]:
    from cnnkit.deploy.export import _model_inputs, export_onnx
    from cnnkit.deploy.mobile import export_mobile

    records: list[dict] = []
    (work / "runs").mkdir(parents=True, exist_ok=True)
    run, train_s, settings = get_run(name, args, work / "runs")
    label = model_name(run)
    images, _ = _model_inputs(run, "val", 1)
    image = np.ascontiguousarray(images[:1])
    base = {"model": label, "input": list(image.shape), "cpu": cpu}
    emit(
        **base,
        kind="train" if train_s is not None else "reuse",
        seconds=round(train_s, 1) if train_s is not None else None,
        settings=settings,
        run=str(run.path),
        val_accuracy=getattr(run, "val_accuracy", None),
    )
    out = work / "exports" / name
    out.mkdir(parents=True, exist_ok=True)
    quick_calib = {"calibration_images": 32} if args.quick else {}

    def attempt(fmt: str, precisions: tuple[str, ...], fn) -> None:
        """fn() -> {precision: fields}; a line per precision, or one with the error."""
        t0 = time.perf_counter()
        try:
            by_precision = fn()
        except Exception as e:  # a format that fails here must not stop the others
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else repr(e)
            if args.verbose:
                traceback.print_exc()
            for precision in precisions:
                records.append(
                    emit(
                        **base,
                        format=fmt,
                        precision=precision,
                        error=f"{type(e).__name__}: {reason}",
                    )
                )
            return
        export_s = round(time.perf_counter() - t0, 1)
        for precision in precisions:
            if precision in by_precision:
                fields = by_precision[precision]
                records.append(
                    emit(**base, format=fmt, precision=precision, **fields, work_s=export_s)
                )

    attempt("pytorch", ("fp32",), lambda: {"fp32": measure_pytorch(run, image, work, args)})

    onnx_int8: list[Path] = []

    def onnx():
        path = out / "model.onnx"
        r = export_onnx(run, path, quantize="int8", check_images=args.check_images, **quick_calib)
        result = {"fp32": {**measure_file(path, image, args), "parity": r.parity}}
        if r.int8_path:
            onnx_int8.append(Path(r.int8_path))
            result["int8"] = {
                **measure_file(Path(r.int8_path), image, args),
                **int8_fields(r.int8),
            }
        return result

    attempt("onnx", ("fp32", "int8"), onnx)

    for fmt in MOBILE:

        def mobile(fmt=fmt):
            from cnnkit.deploy.mobile import FORMATS

            path = out / f"model{FORMATS[fmt]}"
            r = export_mobile(
                run, fmt, path, quantize="int8", check_images=args.check_images, **quick_calib
            )
            if fmt == "coreml":  # cannot run on Linux: size only
                fp32 = {"size_bytes": r.size_bytes, "note": "Core ML runs on Apple systems only"}
            else:
                fp32 = {**measure_file(path, image, args), "parity": r.parity}
            result = {"fp32": fp32}
            if r.int8_path:
                p8 = Path(r.int8_path)
                timing = (
                    {"size_bytes": file_size(p8)}
                    if fmt == "coreml"
                    else measure_file(p8, image, args)
                )
                result["int8"] = {**timing, **int8_fields(r.int8)}
            elif r.int8 and "refused" in r.int8:  # the export refused its own int8 file
                result["int8"] = {"refused": r.int8["refused"]}
            return result

        attempt(fmt, ("fp32", "int8"), mobile)

    if args.browser:
        attempt(
            "browser",
            ("fp32", "int8"),
            lambda: measure_browser(
                run, image, onnx_int8[0] if onnx_int8 else None, work / name, args
            ),
        )
    return records


# ---------------------------------------------------------------- the table


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def table(records: list[dict]) -> str:
    head = (
        f"{'model':<32} {'format':<11} {'prec':<5} {'size':>9} {'load s':>8} "
        f"{'med ms':>8} {'p90 ms':>8} {'runs':>5} {'int8 Δacc':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        if r.get("kind"):
            continue
        if "error" in r or "refused" in r:
            why = f"error: {r['error']}" if "error" in r else f"refused: {r['refused']}"
            lines.append(f"{r['model']:<32} {r['format']:<11} {r['precision']:<5} {why[:80]}")
            continue
        load = f"{r['load_s']:.4f}" if r.get("load_s") is not None else "-"
        med = f"{r['latency_median_ms']:.3f}" if "latency_median_ms" in r else "-"
        p90 = f"{r['latency_p90_ms']:.3f}" if "latency_p90_ms" in r else "-"
        runs = str(r.get("latency_runs", "-"))
        change = r.get("int8_accuracy_change_points")
        delta = f"{change:+.2f} pt" if change is not None else "-"
        lines.append(
            f"{r['model']:<32} {r['format']:<11} {r['precision']:<5} "
            f"{fmt_bytes(r.get('size_bytes')):>9} {load:>8} {med:>8} {p90:>8} {runs:>5} "
            f"{delta:>9}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-mnist", type=Path, help="reuse this seed-cnn/MNIST run folder")
    p.add_argument("--run-cats", type=Path, help="reuse this EfficientNet-Lite0 run folder")
    p.add_argument("--models", default="mnist,cats", help="which: mnist, cats or both")
    p.add_argument("--quick", action="store_true", help="a smoke test: small counts")
    p.add_argument("--runs", type=int, help="latency calls at most (default 100)")
    p.add_argument("--seconds", type=float, help="latency seconds at most (default 20)")
    p.add_argument("--loads", type=int, help="load-time repeats (default 5)")
    p.add_argument("--check-images", type=int, help="images for parity and int8 accuracy")
    p.add_argument("--mnist-limit", type=int, help="MNIST training images (default 6000)")
    p.add_argument("--cats-size", type=int, help="EfficientNet input size (default 224)")
    p.add_argument("--cats-limit", type=int, help="cats-vs-dogs training photos (default 200)")
    p.add_argument("--cats-epochs", type=int, default=3, help="head epochs (default 3)")
    p.add_argument("--cats-finetune-epochs", type=int, default=0, help="(default 0)")
    p.add_argument("--no-browser", dest="browser", action="store_false")
    p.add_argument("--keep", type=Path, help="write runs and exports here (kept)")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failed formats")
    args = p.parse_args()
    quick = args.quick
    defaults = {
        "runs": (10, 100),
        "seconds": (2.0, 20.0),
        "loads": (2, 5),
        "check_images": (64, 500),
        "mnist_limit": (1000, 6000),
        "cats_size": (96, 224),
        "cats_limit": (40, 200),
    }
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(models) - {"mnist", "cats"}:
        raise SystemExit(f"--models: unknown {', '.join(sorted(unknown))}")

    cpu = cpu_model()
    print(
        f"device-export on {cpu}, {cpu_simd()}; load average {os.getloadavg()[0]:.2f}; "
        f"torch on {describe(torch.device('cpu'))}; "
        f"{'quick' if quick else 'full'}: up to {args.runs} runs or {args.seconds:g} s, "
        f"{args.loads} loads",
        file=sys.stderr,
    )
    emit(
        kind="environment",
        cpu=cpu,
        simd=cpu_simd(),
        torch_threads=torch.get_num_threads(),
        load_average=[round(x, 2) for x in os.getloadavg()],
        versions=versions(),
        quick=quick,
        runs=args.runs,
        seconds=args.seconds,
        loads=args.loads,
        warmup=WARMUP,
        check_images=args.check_images,
    )
    records: list[dict] = []
    keep = args.keep
    with contextlib.ExitStack() as stack:
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            work = keep
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="device-export-")))
        for name in models:
            records += measure_model(name, args, work / name, cpu)
    print("\n" + table(records), file=sys.stderr)


if __name__ == "__main__":
    main()
