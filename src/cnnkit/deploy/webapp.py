"""``cnnkit export RUN --format webapp``: a folder that classifies images in the browser.

The folder is a static web app with no server behind it: ``index.html``, its script and
style, the verified ONNX file (``export_onnx``: uint8 NCHW images in, probabilities out),
``config.json`` (classes, preprocessing, provenance, the ONNX Runtime Web version), ONNX
Runtime Web's WebAssembly build, a web app manifest with icons, and a service worker that
precaches every file, so after one visit the app works offline and installs as a PWA.
Any static host serves it (HTTPS, or localhost, for the service worker and the camera).

ONNX Runtime Web is vendored from npm at export time, never fetched from a CDN by the page:
from ``$CNNKIT_ORT_WEB`` (a folder holding the package), else from cnnkit's cache, which
``ensure_ort_web`` fills with ``npm install`` when npm is on PATH
(``python -m cnnkit.deploy.webapp --fetch-runtime`` does that ahead of time).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ORT_WEB_VERSION = "1.31.1"  # checked here: classifies in Chromium, offline, as PyTorch does
ORT_WEB_ENV = "CNNKIT_ORT_WEB"
# The smallest set for the WebAssembly execution provider: the ES-module bundle (the
# Emscripten glue inside it) and the SIMD build. The threaded build runs single-threaded
# (numThreads = 1): a static host sends no COOP/COEP headers, so no SharedArrayBuffer.
# The bundle is renamed to .js: every static host sends .js as JavaScript, not all know .mjs
# (and browsers refuse a module script sent as application/octet-stream).
ORT_WEB_FILES = {
    "ort.wasm.bundle.min.mjs": "ort/ort.wasm.bundle.min.js",
    "ort-wasm-simd-threaded.wasm": "ort/ort-wasm-simd-threaded.wasm",
}
STATIC = Path(__file__).with_name("webapp")  # index.html, app.js, style.css, sw.js
APP_FILES = ("index.html", "app.js", "style.css")
CONFIG_FILE = "config.json"
# How the app's files must be served (a browser refuses a module script or WebAssembly sent
# as anything else): by cnnkit serve at /device/ and by StaticServer.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
FORMAT = "cnnkit-webapp/1"
CACHE_PREFIX = "cnnkit-webapp"


class WebRuntimeNotFoundError(RuntimeError):
    """ONNX Runtime Web is not available and cannot be fetched; the message says the fix."""


@dataclass
class WebappResult:
    path: str
    files: dict  # relative path -> size in bytes
    ort_web: str  # the ONNX Runtime Web version vendored
    cache: str  # the service worker's cache name (changes with any file's content)
    parity: dict  # ONNX Runtime vs PyTorch, from export_onnx

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- ONNX Runtime Web, from npm


def ort_web_cache_dir(version: str = ORT_WEB_VERSION) -> Path:
    """Where cnnkit keeps the npm package: ``~/.cache/cnnkit/onnxruntime-web/<version>``."""
    from cnnkit.data.builtin import user_cache_dir

    return user_cache_dir() / "onnxruntime-web" / version


def _package_in(prefix: Path) -> Path:
    return prefix / "node_modules" / "onnxruntime-web"


def _missing_files(package: Path) -> list[str]:
    needed = ["package.json", *(f"dist/{name}" for name in ORT_WEB_FILES)]
    return [name for name in needed if not (package / name).is_file()]


def package_version(package: Path) -> str:
    """The version in a package folder's package.json."""
    return str(json.loads((package / "package.json").read_text())["version"])


def ensure_ort_web(progress: bool = True) -> Path:
    """The onnxruntime-web package folder (package.json + dist/): ``$CNNKIT_ORT_WEB``, else
    the cache, filled with npm when it is empty. ``progress``: say on stderr when fetching.

    Raises ``WebRuntimeNotFoundError`` (one line naming the fix) when there is no package
    and no way to fetch it.
    """
    given = os.environ.get(ORT_WEB_ENV)
    if given:
        package = Path(given).expanduser()
        missing = _missing_files(package)
        if missing:
            raise WebRuntimeNotFoundError(
                f"{ORT_WEB_ENV}={given} does not hold the onnxruntime-web package (no "
                f"{missing[0]}): point it at a node_modules/onnxruntime-web folder, or unset it "
                f"to let cnnkit fetch onnxruntime-web@{ORT_WEB_VERSION} with npm"
            )
        return package
    prefix = ort_web_cache_dir()
    package = _package_in(prefix)
    if not _missing_files(package):
        return package
    fix = (
        "install Node.js with npm and run this again (or 'python -m cnnkit.deploy.webapp "
        f"--fetch-runtime'), or set {ORT_WEB_ENV} to a folder holding the onnxruntime-web "
        "package (its package.json and dist/)"
    )
    if os.environ.get("CNNKIT_OFFLINE", "") not in ("", "0"):
        raise WebRuntimeNotFoundError(
            f"onnxruntime-web {ORT_WEB_VERSION} is not in {prefix} and CNNKIT_OFFLINE is set, "
            f"so it is not fetched: unset CNNKIT_OFFLINE, or set {ORT_WEB_ENV} to a folder "
            "holding the onnxruntime-web package"
        )
    npm = shutil.which("npm")
    if npm is None:
        raise WebRuntimeNotFoundError(
            f"the web app needs onnxruntime-web {ORT_WEB_VERSION}, not found in {prefix}, and "
            f"npm is not on PATH to fetch it: {fix}"
        )
    _npm_install(npm, prefix, progress)
    missing = _missing_files(package)
    if missing:
        raise WebRuntimeNotFoundError(
            f"npm installed onnxruntime-web@{ORT_WEB_VERSION} into {prefix} without "
            f"dist/{missing[0]}: {fix}"
        )
    return package


def _npm_install(npm: str, prefix: Path, progress: bool) -> None:
    """``npm install`` into a fresh folder beside ``prefix``, renamed into place when done:
    an interrupted install never leaves a half-filled cache."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(
            f"fetching onnxruntime-web {ORT_WEB_VERSION} with npm into {prefix} (once; about "
            "150 MB unpacked)",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{prefix.name}-", dir=prefix.parent))
    try:
        cmd = [
            npm,
            "install",
            "--no-save",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(work),
            f"onnxruntime-web@{ORT_WEB_VERSION}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            reason = _npm_reason(done.stderr) or f"npm's exit status {done.returncode}"
            raise WebRuntimeNotFoundError(
                f"npm could not fetch onnxruntime-web@{ORT_WEB_VERSION} ({reason}); check the "
                f"network or the npm registry setting, or set {ORT_WEB_ENV} to a folder "
                "holding the package"
            )
        shutil.rmtree(prefix, ignore_errors=True)  # a broken earlier copy
        work.rename(prefix)
        if progress:
            seconds = time.perf_counter() - start
            print(f"fetched onnxruntime-web in {seconds:.0f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _npm_reason(stderr: str) -> str:
    """The line of npm's error output that says what went wrong (not its codes, not where
    its log is)."""
    lines = [
        re.sub(r"^npm (error|ERR!)\s*", "", line).strip()
        for line in stderr.splitlines()
        if re.match(r"npm (error|ERR!)", line)
    ]
    lines = [line for line in lines if line]
    detail = [
        line for line in lines if not re.match(r"(code|syscall|errno|A complete log)\b", line)
    ]
    return (detail or lines or [""])[0]


# ---------------------------------------------------------------- the app


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _make_icon(size: int):
    """The app's icon: a grid of pixels on a rounded blue square, like the serve page's."""
    from PIL import Image, ImageDraw

    big = 512
    im = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.rounded_rectangle((0, 0, big - 1, big - 1), radius=96, fill=(76, 155, 232, 255))
    u = big // 16
    for x, y in ((4, 4), (9, 4), (4, 9)):  # three white cells of a 2x2 grid
        d.rectangle((x * u, y * u, (x + 3) * u - 1, (y + 3) * u - 1), fill=(255, 255, 255, 255))
    return im if size == big else im.resize((size, size), Image.LANCZOS)


def _model_io(path: Path) -> dict:
    """The ONNX graph's input and output names, the input's element type and shape."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inp = graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name
    return {
        "input": inp.name,
        "dtype": dtype,
        "shape": dims,
        "output": graph.output[0].name,
        "outputs": [o.name for o in graph.output],
    }


def _onnx_metadata(path: Path) -> dict:
    from .export import read_metadata

    return read_metadata(path)


def _title(run) -> str:
    data = Path(str(run.config.data.name).rstrip("/")).name or run.config.data.name  # a folder
    return f"{run.config.model.name} on {data}: {len(run.classes)} classes"


def _write_app(run, out: Path, package: Path, parity: dict) -> str:
    """Everything but the model beside it in ``out``; returns the ORT Web version."""
    version = package_version(package)
    (out / "ort").mkdir()
    for source, target in ORT_WEB_FILES.items():
        shutil.copyfile(package / "dist" / source, out / target)
    (out / "ort" / "NOTICE.txt").write_text(
        f"ONNX Runtime Web {version} (npm package onnxruntime-web), "
        "Copyright (c) Microsoft Corporation. MIT License: "
        "https://github.com/microsoft/onnxruntime/blob/main/LICENSE\n"
    )
    title = _title(run)
    for name in APP_FILES:
        text = (STATIC / name).read_text()
        if name == "index.html":
            text = text.replace("__TITLE__", html.escape(title))
        (out / name).write_text(text)
    for size in (192, 512):
        _make_icon(size).save(out / f"icon-{size}.png", optimize=True)
    manifest = {
        "name": f"cnnkit: {title}",
        "short_name": run.config.model.name[:12] or "cnnkit",
        "description": f"Classifies photos on this device ({', '.join(run.classes[:10])})",
        "start_url": "./",
        "scope": "./",
        "display": "standalone",
        "background_color": "#ffffff",
        "theme_color": "#4c9be8",
        "icons": [
            {"src": "icon-192.png", "sizes": "192x192", "type": "image/png", "purpose": "any"},
            {"src": "icon-512.png", "sizes": "512x512", "type": "image/png", "purpose": "any"},
        ],
    }
    (out / "manifest.webmanifest").write_text(json.dumps(manifest, indent=2))
    exported = _onnx_metadata(out / "model.onnx")  # what export_onnx wrote into the file
    config = {
        "format": FORMAT,
        "title": title,
        "classes": run.classes,
        # as cnnkit prepares an image (data/decode.py to_input_tensor), done in app.js
        "preprocessing": {**run.preprocessing, "layout": "nchw", "input_dtype": "uint8"},
        "model": {"file": "model.onnx", **_model_io(out / "model.onnx")},
        "val_accuracy": run.val_accuracy,
        # below its threshold the app answers "unknown" (runs/reject.py); null: no rule
        "rejection": exported.get("rejection"),
        # several labels per image: sigmoid outputs, each label over its own threshold
        "multilabel": exported.get("multilabel"),
        "parity": parity,
        "ort_web": {"version": version, "files": sorted(ORT_WEB_FILES.values())},
        "provenance": {
            "model": run.config.model.name,
            "data": run.config.data.name,
            "run": str(run.path),
            "checkpoint": run.checkpoint_ref,
        },
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    details = json.loads((out / "model.json").read_text())  # export_onnx's record
    details["ort_web"] = version
    (out / "model.json").write_text(json.dumps(details, indent=2))
    return version


def _write_service_worker(out: Path) -> str:
    """sw.js, precaching every file of ``out``; returns its cache name, which is a hash of
    all the files' contents: a new export installs a new cache and drops the old one."""
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    template = (STATIC / "sw.js").read_text()
    h = hashlib.sha256(template.encode())
    for name in files:
        h.update(f"{name}\0{_sha256(out / name)}\n".encode())
    cache = f"{CACHE_PREFIX}-{h.hexdigest()[:16]}"
    sw = template.replace('"__CACHE__"', json.dumps(cache)).replace("__FILES__", json.dumps(files))
    (out / "sw.js").write_text(sw)
    return cache


def check_output(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier web app export (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file; the web app is a folder: choose --out DIR")
    if any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise FileExistsError(
            f"{out} holds other files and is not a cnnkit web app; choose an empty or new "
            "folder with --out DIR"
        )
    if (out / CONFIG_FILE).is_file():
        try:
            fmt = json.loads((out / CONFIG_FILE).read_text()).get("format", "")
        except (ValueError, AttributeError):
            fmt = ""
        if not str(fmt).startswith("cnnkit-webapp"):
            raise FileExistsError(
                f"{out} holds a {CONFIG_FILE} that is not a cnnkit web app's; choose another "
                "folder with --out DIR"
            )


def export_webapp(
    run,
    output: str | Path | None = None,
    *,
    ort_web: str | Path | None = None,
    check_images: int | None = 2000,
) -> WebappResult:
    """Write the browser app of ``run`` into ``output`` (default ``<run>/webapp``).

    ``ort_web``: the onnxruntime-web package folder (default: ``ensure_ort_web()``). The
    model is ``export_onnx``'s, verified there against PyTorch. The folder is built beside
    ``output`` and then put in its place: a failed export leaves an earlier one intact.
    """
    from .export import export_onnx

    out = Path(output) if output else run.path / "webapp"
    check_output(out)
    package = Path(ort_web) if ort_web else ensure_ort_web()
    missing = _missing_files(package)
    if missing:
        raise WebRuntimeNotFoundError(
            f"{package} is not the onnxruntime-web package (no {missing[0]})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the app from a web server's user
    try:
        result = export_onnx(run, work / "model.onnx", layout="nchw", check_images=check_images)
        version = _write_app(run, work, package, result.parity)
        cache = _write_service_worker(work)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        # a refused model stays where ExportMismatchError's message says, for inspection
        if work.exists() and not (work / "model.rejected.onnx").exists():
            shutil.rmtree(work, ignore_errors=True)
    files = {
        p.relative_to(out).as_posix(): p.stat().st_size
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }
    return WebappResult(str(out), files, version, cache, result.parity)


# ---------------------------------------------------------------- for cnnkit serve


class StaticServer:
    """A plain static host for an exported folder on 127.0.0.1 at a free port, from a thread
    (``with StaticServer(folder) as server: ... server.url``), as any static host would
    serve it: for a preview, the browser tests and the benchmark. ``requests``: the paths
    it answered (a service worker that answers offline leaves none)."""

    def __init__(self, folder: Path):
        import functools
        import http.server
        import threading

        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MEDIA_TYPES}

            def log_message(self, *args):
                server.requests.append(self.path)

        handler = functools.partial(Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def webapp_files(folder: Path) -> dict[str, Path]:
    """The files a web app folder's service worker lists (relative path -> file), sw.js
    included; empty when ``folder`` holds no web app."""
    config = folder / CONFIG_FILE
    if not (config.is_file() and (folder / "sw.js").is_file()):
        return {}
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return {name: folder / name for name in sorted(names)}


def webapp_checkpoint(folder: Path) -> dict | None:
    """The checkpoint a web app folder was exported from (None if it does not say)."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text())["provenance"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m cnnkit.deploy.webapp --fetch-runtime``: fill the ONNX Runtime Web cache."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cnnkit.deploy.webapp")
    parser.add_argument(
        "--fetch-runtime",
        action="store_true",
        help=f"make sure onnxruntime-web {ORT_WEB_VERSION} is at hand (npm install into the cache)",
    )
    args = parser.parse_args(argv)
    if not args.fetch_runtime:
        parser.print_help()
        return 2
    try:
        package = ensure_ort_web(progress=True)
    except WebRuntimeNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"onnxruntime-web {package_version(package)}: {package}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
