"""``cnnkit export --format webapp``: the browser app, offline, against PyTorch; the runtime
it vendors from npm; and ``cnnkit serve``'s /device/."""

import copy
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.data import load_dataset

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from cnnkit.deploy import webapp  # noqa: E402

# The runtime as the Makefile fetches it ('python -m cnnkit.deploy.webapp --fetch-runtime'),
# found now: the autouse fixture points the user cache at an empty folder during each test.
ORT_WEB = os.environ.get(webapp.ORT_WEB_ENV) or str(webapp._package_in(webapp.ort_web_cache_dir()))
DIGITS = 12


@pytest.fixture(scope="module")
def ort_web() -> str:
    if webapp._missing_files(Path(ORT_WEB)):
        message = (
            f"onnxruntime-web not at {ORT_WEB}: python -m cnnkit.deploy.webapp --fetch-runtime"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return ORT_WEB


@pytest.fixture(scope="module")
def app_dir(tiny_run, ort_web) -> Path:
    """The web app of the tiny MNIST run, exported by the CLI into <run>/webapp."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(webapp.ORT_WEB_ENV, ort_web)
        assert main(["export", str(tiny_run.path), "--format", "webapp"]) == 0
    return tiny_run.path / "webapp"


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory, tiny_run) -> list[tuple[Path, str, float]]:
    """MNIST test digits as PNG files, with PyTorch's answer (a class, or "unknown") and its
    top probability; the last is the digit of the first 500 least like the training ones,
    well below the run's "unknown" threshold."""
    data = load_dataset("mnist", val_split=0).test
    folder = tmp_path_factory.mktemp("digits")
    _, energy = tiny_run.outputs(data.images[:500])
    odd = int(energy.argmin())
    assert float(energy[odd]) < tiny_run.rejection["threshold"] - 0.5  # not a near-tie
    rows = [*range(DIGITS), odd]
    batch = data.images[rows]
    with torch.no_grad():  # in float32, as the browser computes (no bf16 autocast)
        logits = tiny_run.model(tiny_run.normalizer(batch.to(tiny_run.device))).float().cpu()
    probs, energy = logits.softmax(1), torch.logsumexp(logits, 1)
    threshold = tiny_run.rejection["threshold"]
    out = []
    for i, row in enumerate(rows):
        path = folder / f"digit-{i}.png"
        Image.fromarray(data.images[row, 0].numpy()).save(path)
        unknown = float(energy[i]) < threshold
        label = "unknown" if unknown else tiny_run.classes[int(probs[i].argmax())]
        out.append((path, label, float(probs[i].max())))
    return out


def _wait(page, expression: str, timeout: float = 30.0):
    """Poll ``expression`` in the page until truthy (page.evaluate is not held to the page's
    CSP, which forbids eval and so playwright's wait_for_function)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {expression}")


def _classify(page, path: Path) -> tuple[str, float]:
    """Upload ``path`` as a person picks a file; the shown top class and its percentage."""
    from playwright.sync_api import expect

    page.set_input_files("#file", str(path))
    expect(page.locator(f'#label[data-file="{path.name}"]')).to_have_count(1, timeout=20_000)
    pct = page.inner_text("#bars .bar:first-child .pct")
    return page.inner_text("#label"), float(pct.rstrip("%"))


def test_webapp_offline_in_chromium_matches_pytorch(browser, app_dir, digit_files, tiny_run):
    from playwright.sync_api import expect

    config = json.loads((app_dir / "config.json").read_text())
    assert config["ort_web"]["version"] == webapp.package_version(Path(ORT_WEB))
    details = json.loads((app_dir / "model.json").read_text())  # export_onnx's, added to
    assert details["ort_web"] == config["ort_web"]["version"]
    assert config["model"] == {
        "file": "model.onnx",
        "input": "images",
        "dtype": "uint8",
        "shape": ["batch", 1, 28, 28],
        "output": "probabilities",
        "outputs": ["probabilities", "ood_score"],
    }
    assert config["rejection"]["score"] == "energy"
    assert config["rejection"]["threshold"] == tiny_run.rejection["threshold"]
    assert digit_files[-1][1] == "unknown"
    assert config["classes"] == tiny_run.classes and config["parity"]["top1_agreement"] == 1.0
    files = sorted(p.relative_to(app_dir).as_posix() for p in app_dir.rglob("*") if p.is_file())
    sw = (app_dir / "sw.js").read_text()
    precached = json.loads(re.search(r"const FILES = (\[.*?\]);", sw).group(1))
    assert precached == [f for f in files if f != "sw.js"]  # every file but itself
    assert {"ort/ort.wasm.bundle.min.js", "ort/ort-wasm-simd-threaded.wasm"} <= set(files)
    assert not any(f.endswith((".map", ".mjs")) for f in files)  # only what the app needs
    umask = os.umask(0)
    os.umask(umask)
    assert app_dir.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700

    with webapp.StaticServer(app_dir) as server:
        context = browser.new_context()
        page = context.new_page()
        problems: list[str] = []  # console errors (CSP violations among them), failed loads
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"failed {r.url}"))
        page.goto(server.url)
        expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=30_000)
        _wait(page, "navigator.serviceWorker.controller !== null")
        _wait(page, "navigator.serviceWorker.ready.then(r => r.active.state === 'activated')")
        keys = page.evaluate("caches.keys()")
        assert len(keys) == 1 and keys[0].endswith(re.search(r'"(cnnkit-webapp-\w+)"', sw)[1])
        cached = page.evaluate(
            "caches.open(" + json.dumps(keys[0]) + ").then(c => c.keys()).then(rs => rs.length)"
        )
        assert cached == len(precached)
        assert "ONNX Runtime Web " + config["ort_web"]["version"] in page.inner_text("#info")

        # No network from here on: the page, the runtime and the model come from the cache.
        context.set_offline(True)
        served = len(server.requests)
        from_worker: list[tuple[str, bool]] = []  # http responses (not the blob: previews)
        page.on(
            "response",
            lambda r: (
                r.url.startswith("http") and from_worker.append((r.url, r.from_service_worker))
            ),
        )
        page.reload()
        expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=30_000)
        shown = [_classify(page, path) for path, _, _ in digit_files]
        page.screenshot(path=str(app_dir.parent / "webapp.png"))
        context.close()
    assert len(server.requests) == served  # the static host heard nothing while offline
    assert len(from_worker) >= 5 and all(sw for _, sw in from_worker), from_worker
    assert problems == []
    assert [label for label, _ in shown] == [label for _, label, _ in digit_files]
    for (_, pct), (_, _, p) in zip(shown, digit_files, strict=True):
        assert abs(pct - 100 * p) <= 0.051  # the same pixels: only the display rounds


def test_new_export_gets_a_new_cache_name(app_dir, tmp_path):
    copy = tmp_path / "app"
    shutil.copytree(app_dir, copy)
    (copy / "sw.js").unlink()
    before = webapp._write_service_worker(copy)
    assert before in (app_dir / "sw.js").read_text()  # the same files: the same name
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    after = webapp._write_service_worker(copy)
    assert after != before and after.startswith("cnnkit-webapp-")


def test_export_refuses_a_folder_of_other_files(tiny_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code = main(["export", str(tiny_run.path), "--format", "webapp", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "not a cnnkit web app" in err and err.count("\n") == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_runtime_is_one_line_naming_the_fix(tiny_run, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(webapp.ORT_WEB_ENV, str(empty))
    out = tmp_path / "app"
    assert main(["export", str(tiny_run.path), "--format", "webapp", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {webapp.ORT_WEB_ENV}={empty} does not hold the onnxruntime-web")
    assert not out.exists()

    # nothing given, nothing cached, no npm on PATH
    monkeypatch.delenv(webapp.ORT_WEB_ENV)
    monkeypatch.delenv("CNNKIT_OFFLINE")
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(webapp.WebRuntimeNotFoundError) as e:
        webapp.ensure_ort_web()
    message = str(e.value)
    assert "npm is not on PATH" in message and "install Node.js" in message
    assert webapp.ORT_WEB_ENV in message and "\n" not in message

    monkeypatch.setenv("CNNKIT_OFFLINE", "1")  # offline: npm is not even tried
    with pytest.raises(webapp.WebRuntimeNotFoundError, match="CNNKIT_OFFLINE is set"):
        webapp.ensure_ort_web()


def _fake_npm(folder: Path, script: str) -> None:
    npm = folder / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)


def test_the_runtime_is_fetched_with_npm_into_the_cache(tmp_path, monkeypatch, capsys):
    """A stand-in npm on PATH: the arguments cnnkit passes, the cache it fills, and npm's
    own reason when it fails (the real npm is exercised by --fetch-runtime in CI)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # first
    monkeypatch.delenv("CNNKIT_OFFLINE")
    monkeypatch.delenv(webapp.ORT_WEB_ENV, raising=False)
    _fake_npm(
        bin_dir,
        "echo 'npm error code ECONNREFUSED' >&2\n"
        "echo 'npm error FetchError: request to registry failed' >&2\n"
        "echo 'npm error A complete log of this run can be found in: x.log' >&2\nexit 1\n",
    )
    with pytest.raises(webapp.WebRuntimeNotFoundError) as e:
        webapp.ensure_ort_web()
    assert "(FetchError: request to registry failed)" in str(e.value)
    assert not webapp.ort_web_cache_dir().exists()  # no half-filled cache
    _fake_npm(
        bin_dir,
        'echo "$@" > "$NPM_ARGS"\n'
        'while [ "$1" != "--prefix" ]; do shift; done\n'
        'pkg="$2/node_modules/onnxruntime-web"\nmkdir -p "$pkg/dist"\n'
        'echo \'{"version": "'
        + webapp.ORT_WEB_VERSION
        + '"}\' > "$pkg/package.json"\n'
        + "".join(f'touch "$pkg/dist/{name}"\n' for name in webapp.ORT_WEB_FILES),
    )
    monkeypatch.setenv("NPM_ARGS", str(tmp_path / "args"))
    package = webapp.ensure_ort_web()
    assert package == webapp.ort_web_cache_dir() / "node_modules" / "onnxruntime-web"
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["install", "--no-save", "--ignore-scripts"]
    assert args[-1] == f"onnxruntime-web@{webapp.ORT_WEB_VERSION}"
    assert "fetching onnxruntime-web" in capsys.readouterr().err
    (tmp_path / "args").unlink()
    assert webapp.ensure_ort_web() == package  # cached: npm is not run again
    assert not (tmp_path / "args").exists()


def test_webapp_options_for_onnx_only_are_refused(tiny_run, capsys):
    args = ["export", str(tiny_run.path), "--format", "webapp", "--quantize", "int8"]
    assert main(args) == 1
    assert "--quantize is for --format onnx" in capsys.readouterr().err


def test_serve_offers_the_webapp_at_device(tiny_run, app_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cnnkit.deploy.serve import DEVICE_CSP, create_app

    with TestClient(create_app(tiny_run.path)) as client:
        page = client.get("/").text
        assert 'href="device/"' in page and '<p class="muted" id="where">' in page
        r = client.get("/device/")
        assert r.status_code == 200 and r.text == (app_dir / "index.html").read_text()
        assert r.headers["content-security-policy"] == DEVICE_CSP
        r = client.get("/device/ort/ort-wasm-simd-threaded.wasm")
        assert r.headers["content-type"] == "application/wasm"
        assert r.content == (app_dir / "ort/ort-wasm-simd-threaded.wasm").read_bytes()
        assert client.get("/device/sw.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/device/../config.yaml").status_code == 404
        assert client.get("/device/nothing.js").status_code == 404
        r = client.get("/device", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "device/"
    # a web app of other weights is not offered
    config = json.loads((app_dir / "config.json").read_text())
    stale = {**config, "provenance": {**config["provenance"], "checkpoint": {"file": "x"}}}
    (app_dir / "config.json").write_text(json.dumps(stale))
    try:
        with TestClient(create_app(tiny_run.path)) as client:
            assert 'id="where" hidden' in client.get("/").text
            assert client.get("/device/").status_code == 404
    finally:
        (app_dir / "config.json").write_text(json.dumps(config, indent=2))


def test_cats_vs_dogs_photos_in_chromium(browser, cats_run, cats_dogs_dir, ort_web, tmp_path):
    """Photos of any size: resized (shorter side) and centre-cropped on a canvas, as cnnkit
    does with Pillow; the browser's resampling differs a little, the classes do not."""
    from playwright.sync_api import expect

    out = tmp_path / "webapp"
    plain = copy.copy(cats_run)  # the classes only: no "unknown" rule, whose threshold a
    plain.rejection = None  # photo resampled a little differently could cross
    webapp.export_webapp(plain, out, ort_web=ort_web, check_images=64)
    photos = [
        p
        for kind in ("cats", "dogs")
        for p in sorted((cats_dogs_dir / "validation" / kind).glob("*.jpg"))[:4]
    ]
    torch_top = [p.top[0] for p in cats_run.predict([str(p) for p in photos])]
    with webapp.StaticServer(out) as server:
        context = browser.new_context()
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.goto(server.url)
        expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=30_000)
        shown = [_classify(page, path) for path in photos]
        page.screenshot(path=str(tmp_path / "cats.png"))
        context.close()
    assert problems == []
    # measured: 7 photos within 0.2 points, the least sure one 71.8% vs 75.4%
    assert [label for label, _ in shown] == [label for label, _ in torch_top]
    for (_, pct), (_, p) in zip(shown, torch_top, strict=True):
        assert abs(pct - 100 * p) < 10, (shown, torch_top)


def test_serve_device_page_classifies_in_chromium(browser, tiny_run, app_dir, digit_files):
    """The server's page links to /device/, where the same app runs in the browser, under
    the server's own headers (its Content-Security-Policy among them)."""
    import socket

    import uvicorn
    from playwright.sync_api import expect

    from cnnkit.deploy.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(tiny_run.path, host="127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        context = browser.new_context()
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.goto(f"http://127.0.0.1:{port}/")
        # the server's own page: the digit below the threshold is answered "unknown"
        odd, _, _ = digit_files[-1]
        page.set_input_files("#file", str(odd))
        expect(page.locator("#label")).to_have_text("unknown", timeout=20_000)
        expect(page.locator("#unknown")).to_contain_text("energy score")
        assert page.locator("#bars .bar").count() == 5  # its best guesses still shown
        page.click("#device-link")
        expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=30_000)
        assert page.url == f"http://127.0.0.1:{port}/device/"
        path, label, _ = digit_files[0]
        assert _classify(page, path)[0] == label
        _wait(page, "navigator.serviceWorker.controller !== null")
        context.close()
    finally:
        server.should_exit = True
        thread.join(10)
    assert problems == []
