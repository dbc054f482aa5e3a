"""The commands' behaviour at their edges, through cnnkit.cli.main: bad input is one line."""

import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from cnnkit.cli import main
from conftest import make_photos


def _png_header_only(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims width x height pixels (a decompression
    bomb as Pillow sees it: it refuses from the header, before decoding anything)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> list[Path]:
    """Four MNIST test digits saved as PNG files."""
    from cnnkit.data import BUILTINS, is_available, load_dataset

    if is_available(BUILTINS["mnist"]) is None:
        pytest.skip("MNIST not available")
    folder = tmp_path_factory.mktemp("digits")
    images = load_dataset("mnist", val_split=0).test.images[:4]
    paths = []
    for i, image in enumerate(images):
        path = folder / f"digit{i}.png"
        Image.fromarray(image[0].numpy(), "L").save(path)
        paths.append(path)
    return paths


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_predict_reports_a_decompression_bomb_and_still_predicts_the_rest(
    tiny_run, digit_files, tmp_path, capsys
):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20_000, 20_000))  # 400 million pixels
    files = [digit_files[0], bomb, digit_files[1]]
    assert main(["predict", str(tiny_run.path), *map(str, files), "--json"]) == 1
    captured = capsys.readouterr()
    predictions = json.loads(captured.out)["predictions"]
    assert [("label" in p, "error" in p) for p in predictions] == [
        (True, False),
        (False, True),
        (True, False),
    ]
    assert str(bomb) in predictions[1]["error"] and "too large" in predictions[1]["error"]

    assert main(["predict", str(tiny_run.path), *map(str, files)]) == 1
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert str(bomb) in line and "too large" in line
    assert [row.split(":")[0] for row in captured.out.splitlines()] == [
        str(digit_files[0]),
        str(digit_files[1]),
    ]


def _garbage_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07\x12\x04abcd\x3a\xff\xff\xff not a protobuf")
    return path


def _onnx_without_graph(tmp_path: Path) -> Path:
    """cnnkit's metadata, so it reads, but no graph for ONNX Runtime to run."""
    onnx = pytest.importorskip("onnx")
    model = onnx.ModelProto(ir_version=8)
    for key, value in {"classes": ["a", "b"], "preprocessing": {"size": [28, 28]}}.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = f"cnnkit.{key}", json.dumps(value)
    path = tmp_path / "no-graph.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("make_file", [_garbage_onnx, _onnx_without_graph])
def test_a_corrupt_onnx_file_is_one_line_naming_it(make_file, digit_files, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    bad = make_file(tmp_path)
    assert main(["predict", str(bad), str(digit_files[0])]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "export it again with 'cnnkit export'" in line

    pytest.importorskip("fastapi")
    assert main(["serve", str(bad)]) == 1  # refused while loading, before serving
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "cnnkit export" in line


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_serve_refuses_a_port_outside_1_to_65535(port, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "model.onnx", "--port", port])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --port" in err and "1-65535" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["serve", "runs/any"], "fastapi"),
        (["serve", "model.onnx"], "onnxruntime"),
        (["export", "runs/any"], "onnx"),
        (["predict", "model.onnx", "x.png"], "onnxruntime"),
    ],
)
def test_missing_deploy_extras_name_the_install_command(argv, missing, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ModuleNotFoundError
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"needs {missing}" in line and "pip install 'cnnkit[deploy]'" in line


def test_export_to_a_place_it_cannot_write_fails_before_exporting(tiny_run, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("a file where the output folder would be")
    out = not_a_folder / "model.onnx"
    assert main(["export", str(tiny_run.path), "--out", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot write to {not_a_folder}" in line and "--out" in line


def test_train_refuses_inf_and_a_list_for_a_number(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    assert main(["train", "--lr", "inf", "--runs-dir", str(runs_dir)]) == 1
    assert (
        _one_error_line(capsys.readouterr().err) == "error: optim.lr = inf must be a finite number"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim: {lr: [1, 2]}\n")
    assert main(["train", "--config", str(recipe), "--runs-dir", str(runs_dir)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == "error: setting 'optim.lr' must be float, got [1, 2]"
    assert not runs_dir.exists()


def test_class_names_print_as_themselves_and_piped_paths_are_not_folded(tmp_path, capsys):
    # deeper than rich's default 80 columns, so a piped table used to fold it mid-word
    root = make_photos(tmp_path / ("a-long-folder-name-" * 5), per_class=4)
    (root / "red").rename(root / "[red]cat")  # rich markup, were it parsed
    assert main(["datasets", "check", str(root)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "cat" in line and "│" in line]
    assert rows and all("[red]cat" in row for row in rows)
    assert f"{root}: images per class" in out.splitlines()


def test_tables_never_parse_markup():
    from rich.console import Console

    from cnnkit.commands import _table

    table = _table("[bold]title", "[i]class", "count")
    table.add_row("[red]cat", "3")
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "[bold]title" in text and "[i]class" in text and "[red]cat" in text


def test_cache_lists_and_clears_the_decode_cache_under_xdg_cache_home(tmp_path, capsys):
    from cnnkit.data.folder import decode_images

    # conftest points XDG_CACHE_HOME at a fresh folder for every test
    cnnkit_cache = Path(os.environ["XDG_CACHE_HOME"]) / "cnnkit"
    paths = sorted(p for p in make_photos(tmp_path / "photos", per_class=2).rglob("*.*"))
    for size in (16, 24):  # one cache entry per decode size
        decode_images(paths, 3, size, workers=1)
    (cnnkit_cache / "datasets" / "mnist").mkdir(parents=True)

    assert main(["cache", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    folders = {f["name"]: f for f in listing["folders"]}
    assert listing["root"] == str(cnnkit_cache)
    assert folders["decoded"]["path"] == str(cnnkit_cache / "decoded")
    assert folders["decoded"]["entries"] == 2
    assert folders["decoded"]["size_bytes"] > 6 * 3 * 24 * 24
    assert folders["datasets"]["entries"] == 1

    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(cnnkit_cache / "decoded") in out and "cnnkit cache clear" in out

    # nobody to ask (stdin is not a terminal under pytest): clearing needs --yes
    assert main(["cache", "clear", "decoded"]) == 1
    assert "add --yes" in _one_error_line(capsys.readouterr().err)
    assert (cnnkit_cache / "decoded").is_dir()

    assert main(["cache", "clear", "decod"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown cache folder decod; choose from: decoded, datasets, shards" in line

    assert main(["cache", "clear", "decoded", "--yes"]) == 0
    assert "deleted" in capsys.readouterr().out
    assert not (cnnkit_cache / "decoded").exists()
    assert (cnnkit_cache / "datasets" / "mnist").is_dir()  # only what was named
    assert main(["cache", "clear", "--yes"]) == 0
    assert not (cnnkit_cache / "datasets").exists()


@pytest.fixture
def digit_folder(digit_files, tmp_path) -> Path:
    """digits/: two digits at the top, two in a subfolder, plus what is not an image."""
    folder = tmp_path / "digits"
    (folder / "more").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for i, path in enumerate(digit_files):
        target = folder / ("more" if i >= 2 else "") / f"d{i}.png"
        target.write_bytes(path.read_bytes())
    (folder / ".hidden" / "skip.png").write_bytes(digit_files[0].read_bytes())
    (folder / "notes.txt").write_text("not an image, not predicted")
    return folder


def test_predict_a_folder_recursively_into_csv(tiny_run, digit_folder, tmp_path, capsys):
    import csv

    expected_files = [
        digit_folder / "d0.png",
        digit_folder / "d1.png",
        digit_folder / "more" / "d2.png",
        digit_folder / "more" / "d3.png",
    ]
    expected = tiny_run.predict(expected_files, top_k=2)
    out = tmp_path / "predictions.csv"
    assert (
        main(
            ["predict", str(tiny_run.path), str(digit_folder), "--top-k", "2", "--output", str(out)]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == f"wrote 4 predictions to {out}"
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == [str(p) for p in expected_files]
    assert list(rows[0]) == [
        "file",
        "class_1",
        "probability_1",
        "class_2",
        "probability_2",
        "answer",  # the class, or "unknown" below the run's threshold
        "ood_score",
        "error",
    ]
    for row, prediction in zip(rows, expected, strict=True):
        assert row["class_1"] == prediction.top[0][0] and row["error"] == ""
        assert row["answer"] == prediction.label
        assert float(row["ood_score"]) == pytest.approx(prediction.ood_score, abs=1e-5)
        assert float(row["probability_1"]) == pytest.approx(prediction.top[0][1], abs=1e-6)


def test_predict_a_folder_into_json_and_on_stdout_with_errors(
    tiny_run, digit_folder, tmp_path, capsys
):
    (digit_folder / "more" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    out = tmp_path / "predictions.json"
    argv = ["predict", str(tiny_run.path), str(digit_folder), "--output", str(out), "--json"]
    assert main(argv) == 1  # one file could not be read
    captured = capsys.readouterr()
    on_stdout = json.loads(captured.out)
    assert json.loads(out.read_text()) == on_stdout
    sources = [p["source"] for p in on_stdout["predictions"]]
    assert [Path(s).name for s in sources] == ["d0.png", "d1.png", "broken.png", "d2.png", "d3.png"]
    assert "error" in on_stdout["predictions"][2] and "label" in on_stdout["predictions"][3]
    assert f"wrote 5 predictions (1 could not be read) to {out}" in captured.err


def test_predict_refuses_an_empty_folder_and_an_unknown_output_format(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tiny_run.path), str(tmp_path / "empty")]) == 1
    assert "no image files in this folder or below" in _one_error_line(capsys.readouterr().err)
    argv = ["predict", str(tiny_run.path), "x.png", "--output", str(tmp_path / "out.xlsx")]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "--output must be a .csv or .json file" in line


@pytest.mark.parametrize("top_k", ["0", "-2", "three"])
def test_predict_refuses_a_top_k_below_one(top_k, capsys):
    # --top-k 0 used to print "file: None  ()" for every image
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "run", "x.png", "--top-k", top_k])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --top-k" in err and "Traceback" not in err


def test_evaluate_on_a_read_only_run_fails_before_computing(tiny_run, monkeypatch, capsys):
    import errno
    import tempfile

    real = tempfile.TemporaryFile

    def read_only_run(*args, dir=None, **kwargs):  # as on a read-only mount (root ignores modes)
        if dir is not None and Path(dir) == tiny_run.path:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_run)

    def computed(*args, **kwargs):
        raise AssertionError("evaluate computed before checking it can write")

    from cnnkit.runs.run import Run

    monkeypatch.setattr(Run, "logits", computed)
    before = sorted(p.name for p in tiny_run.path.iterdir())
    assert main(["evaluate", str(tiny_run.path)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot write to {tiny_run.path} (Read-only file system)" in line
    assert "copy the run somewhere writable" in line
    assert sorted(p.name for p in tiny_run.path.iterdir()) == before  # nothing computed
