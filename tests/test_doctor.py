"""The data-set doctor and the listing it shares with loading: data sets with nothing to
train on, lists that cannot be read, and entries that are no readable file."""

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from cnnkit.cli import main
from cnnkit.data import list_images, load_folder
from cnnkit.data.doctor import check_dataset
from conftest import make_photos


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: opening a FIFO for reading blocks until a writer comes."""

    def fail(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (blocked on a FIFO?)")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _checks(path: Path) -> dict:
    return {f.check: f for f in check_dataset(path, workers=0).findings}


def _empty_class_folders(root: Path) -> Path:
    for name in ("cats", "dogs", "birds"):
        (root / name).mkdir(parents=True)
    return root


def test_empty_class_folders_are_an_error_for_the_doctor_and_for_loading(tmp_path, capsys):
    root = _empty_class_folders(tmp_path / "photos")
    finding = _checks(root)["no-images"]
    assert finding.level == "error"
    assert "3 class folders, all empty" in finding.message
    with pytest.raises(ValueError, match=r"no images found in .*photos \(3 class folders, all"):
        load_folder(root, image_size=16)
    assert main(["datasets", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "no-images" in out and "no problems found" not in out


def test_a_header_only_list_is_an_error_for_the_doctor_and_for_loading(tmp_path):
    (tmp_path / "list.csv").write_text("path,label\n")
    finding = _checks(tmp_path / "list.csv")["no-images"]
    assert finding.level == "error" and "list.csv" in finding.message
    assert "no rows of path,label" in finding.message
    with pytest.raises(ValueError, match=r"no images found in .*list.csv: the list has no rows"):
        load_folder(tmp_path / "list.csv", image_size=16)


def test_rows_with_an_empty_label_are_refused_with_their_line_numbers(tmp_path):
    root = make_photos(tmp_path / "imgs", per_class=2)
    (tmp_path / "list.csv").write_text(
        "path,label\n"
        "imgs/red/red0.png,red\n"
        "imgs/red/red1.jpg,\n"
        "\n"  # a blank line is skipped but still counts as a line
        "imgs/blue/blue0.png,blue\n"
        "imgs/blue/blue1.jpg,  \n"
    )
    assert (root / "red" / "red1.jpg").exists()
    with pytest.raises(ValueError, match=r"list\.csv: lines 3, 6 have an empty label"):
        list_images(tmp_path / "list.csv")
    assert main(["datasets", "check", str(tmp_path / "list.csv")]) == 1
    (tmp_path / "no-path.csv").write_text(" ,red\nimgs/blue/blue0.png,blue\n")
    with pytest.raises(ValueError, match=r"no-path\.csv: line 1 has an empty path; give every"):
        list_images(tmp_path / "no-path.csv")


def test_a_utf16_list_is_refused_naming_the_file_and_the_fix(tmp_path):
    make_photos(tmp_path / "imgs", per_class=2)
    text = "path,label\nimgs/red/red0.png,red\nimgs/blue/blue0.png,blue\n"
    for name, encoding in (("bom.csv", "utf-16"), ("plain.csv", "utf-16-le")):
        (tmp_path / name).write_bytes(text.encode(encoding))
        with pytest.raises(ValueError, match=rf"{name}: .*UTF-16.*save it as UTF-8"):
            list_images(tmp_path / name)
    (tmp_path / "latin1.csv").write_bytes(
        "path,label\nimgs/red/red0.png,rouge é\n".encode("cp1252")
    )
    with pytest.raises(
        ValueError, match=r"latin1\.csv, line 2: not UTF-8 .*save the list as UTF-8"
    ):
        list_images(tmp_path / "latin1.csv")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_a_list_is_reported_not_read(tmp_path):
    make_photos(tmp_path / "imgs", per_class=4)
    os.mkfifo(tmp_path / "imgs" / "pipe.jpg")
    lines = [
        f"imgs/{c}/{f.name},{c}" for c in ("red", "blue") for f in (tmp_path / "imgs" / c).iterdir()
    ]
    (tmp_path / "list.csv").write_text("\n".join(["path,label", *lines, "imgs/pipe.jpg,red"]))
    with deadline(60):
        listing = list_images(tmp_path / "list.csv")
        assert [(p.name, why) for p, why in listing.skipped] == [
            ("pipe.jpg", "not a regular file (a FIFO)")
        ]
        finding = _checks(tmp_path / "list.csv")["not-regular-files"]
        assert "pipe.jpg (not a regular file (a FIFO))" in finding.files[0]
        data = load_folder(tmp_path / "list.csv", image_size=16, val_split=0, test_split=0)
    assert len(data.train) == 8
    assert any("pipe.jpg: not a regular file (a FIFO)" in note for note in data.notes)


def test_link_loops_dangling_links_and_fifos_in_class_folders_are_reported(tmp_path):
    root = make_photos(tmp_path / "photos", per_class=3)
    (root / "red" / "loop.jpg").symlink_to("loop.jpg")
    (root / "red" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "blue" / "elsewhere").symlink_to(tmp_path)  # a linked folder is not followed
    os.mkfifo(root / "green" / "pipe.png")
    expected = {
        "loop.jpg": "symbolic link loop",
        "gone.jpg": f"dangling symbolic link (to {tmp_path / 'missing.jpg'})",
        "elsewhere": "symbolic link to a folder, not followed",
        "pipe.png": "not a regular file (a FIFO)",
    }
    with deadline(60):
        finding = _checks(root)["not-regular-files"]
        assert finding.level == "warning"
        assert sorted(finding.files) == sorted(
            f"{root / ('blue' if n == 'elsewhere' else 'green' if n == 'pipe.png' else 'red') / n}"
            f" ({why})"
            for n, why in expected.items()
        )
        data = load_folder(root, image_size=16, val_split=0, test_split=0)
    assert len(data.train) == 9
    notes = "\n".join(data.notes)
    assert "skipped 4 entr(ies) that are not readable files" in notes
    for name, why in expected.items():
        assert f"{name}: {why}" in notes


def test_list_rows_outside_the_list_folder_are_listed(tmp_path):
    make_photos(tmp_path / "imgs", per_class=3)
    (tmp_path / "lists").mkdir()
    outside_up = "../imgs/red/red0.png"
    outside_abs = str(tmp_path / "imgs" / "blue" / "blue0.png")
    rows = [f"{outside_up},red", f"{outside_abs},blue"]
    rows += [f"../imgs/{c}/{c}{i}.jpg,{c}" for c in ("red", "blue") for i in (1, 2)]
    (tmp_path / "lists" / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "lists" / "inside.png").write_bytes((tmp_path / "imgs/red/red0.png").read_bytes())
    finding = _checks(tmp_path / "lists" / "list.csv")["outside-list-folder"]
    assert finding.level == "info" and "6 listed file(s)" in finding.message
    assert str(tmp_path / "imgs" / "blue" / "blue0.png") in finding.files
    data = load_folder(tmp_path / "lists" / "list.csv", image_size=16, val_split=0, test_split=0)
    assert len(data.train) == 6  # still allowed


def test_rows_inside_the_list_folder_are_not_flagged(tmp_path):
    make_photos(tmp_path / "imgs", per_class=3)
    rows = [f"imgs/{c}/{c}{i}.jpg,{c}" for c in ("red", "blue") for i in (1, 2)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    assert "outside-list-folder" not in _checks(tmp_path / "list.csv")


def test_json_report_of_an_empty_data_set(tmp_path, capsys):
    root = _empty_class_folders(tmp_path / "photos")
    assert main(["datasets", "check", str(root), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [f["check"] for f in out["findings"] if f["level"] == "error"] == ["no-images"]


def test_an_empty_train_folder_is_refused_before_splitting(tmp_path):
    _empty_class_folders(tmp_path / "tree" / "train")
    make_photos(tmp_path / "tree" / "validation", per_class=2)
    with pytest.raises(ValueError, match=r"tree: no training images found, only val; add images"):
        load_folder(tmp_path / "tree", image_size=16)


def test_training_images_that_all_fail_to_decode_are_an_error(tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "photos" / name / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"photos: none of the 6 training image files could be"):
        load_folder(tmp_path / "photos", image_size=16, val_split=0, test_split=0)
