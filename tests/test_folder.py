import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.data import list_images, load_folder
from conftest import make_photos


def test_class_folders_get_a_stratified_saved_split(tmp_path):
    root = make_photos(tmp_path / "photos", per_class=20)
    data = load_folder(root, image_size=32, val_split=0.1, test_split=0.2, seed=0)
    assert data.classes == ["blue", "green", "red"]
    assert (len(data.train), len(data.val), len(data.test)) == (42, 6, 12)
    for part in (data.val, data.test):
        assert torch.bincount(part.labels).tolist() in ([2, 2, 2], [4, 4, 4])
    files = {s: {f for f, _ in data.files[s]} for s in ("train", "val", "test")}
    assert not files["train"] & files["val"] and not files["train"] & files["test"]
    assert data.train.images.shape[1:] == (3, 32, 32)
    # the colour of the pixels is the colour of the class folder
    red = data.train.images[data.train.labels == 2].float().mean(dim=(0, 2, 3))
    assert red[0] > 150 and red[1] < 80 and red[2] < 80


def test_a_folder_name_is_also_looked_up_in_cnnkit_data(tmp_path, monkeypatch):
    make_photos(tmp_path / "store" / "shapes", per_class=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNNKIT_DATA", os.pathsep.join([str(tmp_path / "none"), "store"]))
    files = list_images("shapes")
    assert files.classes == ["blue", "green", "red"]
    assert files.root.resolve() == (tmp_path / "store" / "shapes").resolve()
    with pytest.raises(FileNotFoundError, match="'shapez' is not a built-in .*\\$CNNKIT_DATA"):
        list_images("shapez")


def test_train_val_test_tree_and_validation_alias(tmp_path):
    for split, n in (("train", 8), ("validation", 3), ("test", 2)):
        make_photos(tmp_path / "tree" / split, per_class=n)
    data = load_folder(tmp_path / "tree", image_size=24)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 9, 6)
    assert all(f.startswith("validation/") for f, _ in data.files["val"])


def test_csv_and_tsv_lists(tmp_path):
    root = make_photos(tmp_path / "imgs", per_class=10)
    rows = [(f"imgs/{c}/{f.name}", c) for c in ("red", "blue") for f in (root / c).iterdir()]
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    data = load_folder(tmp_path / "list.csv", image_size=16, val_split=0.2, test_split=0)
    assert data.classes == ["blue", "red"] and len(data.train) + len(data.val) == 20
    assert data.test is None
    tsv = "path\tlabel\tsplit\n" + "".join(
        f"{p}\t{c}\t{'val' if i % 4 == 0 else 'train'}\n" for i, (p, c) in enumerate(rows)
    )
    (tmp_path / "list.tsv").write_text(tsv)
    data = load_folder(tmp_path / "list.tsv", image_size=16)
    assert (len(data.train), len(data.val)) == (15, 5)


def _exif_rotated(path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: black on top
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)


def test_odd_and_broken_files(tmp_path):
    root = make_photos(tmp_path / "photos", per_class=6)
    good = root / "red" / "red1.jpg"
    odd = root / "blue"
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(odd / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((30, 30), 32768, np.uint16)).save(odd / "grey16.png")
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(odd / "transparent.png")
    _exif_rotated(odd / "rotated.jpg")
    (odd / "corrupt.jpg").write_bytes(os.urandom(2000))
    (odd / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (odd / "empty.png").write_bytes(b"")
    (odd / "notes.png").write_text("this is not an image")
    (odd / "readme.txt").write_text("class notes")

    data = load_folder(root, image_size=32, val_split=0, test_split=0)
    notes = "\n".join(data.notes)
    assert "skipped 4 file(s) that could not be decoded" in notes
    for name in ("corrupt.jpg", "truncated.jpg", "empty.png", "notes.png"):
        assert name in notes
    assert "ignored 1 file(s) that are not images: readme.txt" in notes
    assert len(data.train) == 3 * 6 + 4  # the good ones and the 4 odd-but-valid ones

    by_name = {
        f.split("/")[-1]: data.train.images[i].float()
        for i, (f, _) in enumerate(data.files["train"])
    }
    cmyk = by_name["cmyk.jpg"].mean(dim=(1, 2))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60
    assert by_name["grey16.png"].mean().item() == pytest.approx(128, abs=2)
    assert by_name["transparent.png"].min().item() == 255  # composited on white
    rotated = by_name["rotated.jpg"].mean(dim=0)
    assert rotated[:12].mean() < 40 and rotated[-12:].mean() > 215  # black on top now


def test_decoding_is_cached_by_content(tmp_path):
    root = make_photos(tmp_path / "photos", per_class=5)
    first = load_folder(root, image_size=20, val_split=0, test_split=0)
    again = load_folder(root, image_size=20, val_split=0, test_split=0)
    assert any("decoded 15 files" in n for n in first.notes)
    assert any("loaded from the cache" in n for n in again.notes)
    assert torch.equal(first.train.images, again.train.images)
    Image.new("RGB", (40, 30), (0, 0, 0)).save(root / "red" / "red0.png")  # new content
    changed = load_folder(root, image_size=20, val_split=0, test_split=0)
    assert any("decoded 15 files" in n for n in changed.notes)
    assert not torch.equal(first.train.images, changed.train.images)


def test_one_class_is_an_error(tmp_path):
    make_photos(tmp_path / "photos", per_class=3)
    for d in ("green", "blue"):
        for f in (tmp_path / "photos" / d).iterdir():
            f.unlink()
        (tmp_path / "photos" / d).rmdir()
    with pytest.raises(ValueError, match="found 1 class folder.*needs at least two"):
        list_images(tmp_path / "photos")


def test_scratch_model_on_a_folder_end_to_end(tmp_path):
    root = make_photos(tmp_path / "photos", per_class=20)
    run = cnnkit.train(
        data=str(root),
        model="conv16-pool-conv32-gap",
        epochs=3,
        image_size=32,
        lr=3e-3,
        runs_dir=str(tmp_path / "runs"),
        quiet=True,
    )
    split = json.loads((run.path / "split.json").read_text())
    assert len(split["test"]) == 6 and split["classes"] == ["blue", "green", "red"]
    report = run.evaluate(split="test")
    assert report.num_images == 6
    pred = run.predict(root / "green" / "green4.jpg")[0]
    assert pred.label == "green"


def test_doctor_finds_leaks_duplicates_and_problems(tmp_path, capsys):
    from cnnkit.cli import main
    from cnnkit.data.doctor import check_dataset

    make_photos(tmp_path / "d" / "train", per_class=12)
    make_photos(tmp_path / "d" / "val", per_class=2)
    # a training photo copied into val (exact leak); a resized re-encode of another (near leak)
    src = tmp_path / "d" / "train" / "red" / "red4.jpg"
    (tmp_path / "d" / "val" / "red" / "copy.jpg").write_bytes(src.read_bytes())
    grad = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    Image.fromarray(grad).save(tmp_path / "d" / "train" / "blue" / "gradient.png")
    Image.fromarray(grad).resize((80, 60)).save(tmp_path / "d" / "val" / "blue" / "grad.jpg")
    (tmp_path / "d" / "train" / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("RGB", (300, 20), "white").save(tmp_path / "d" / "train" / "green" / "strip.png")

    report = check_dataset(tmp_path / "d", workers=0)
    checks = {f.check: f for f in report.findings}
    assert "copy.jpg [val]" in checks["exact-duplicates-across-splits"].files[0]
    assert "grad.jpg [val]" in " ".join(checks["near-duplicates-across-splits"].files)
    assert "broken.jpg" in checks["unreadable"].files[0]
    assert "strip.png" in checks["extreme-aspect"].files[0]
    assert "tiny" in checks  # the 300x20 strip is 20 px high
    assert report.counts["val"] == [3, 2, 3]

    assert main(["datasets", "check", str(tmp_path / "d"), "--json"]) == 1  # errors found
    out = json.loads(capsys.readouterr().out)
    assert {f["check"] for f in out["findings"]} >= {"unreadable", "exact-duplicates-across-splits"}


def test_train_warns_about_leaks(tmp_path):
    make_photos(tmp_path / "d" / "train", per_class=6)
    make_photos(tmp_path / "d" / "val", per_class=2)
    src = tmp_path / "d" / "train" / "red" / "red4.jpg"
    (tmp_path / "d" / "val" / "red" / "copy.jpg").write_bytes(src.read_bytes())
    run = cnnkit.train(
        data=str(tmp_path / "d"),
        model="conv8-gap",
        epochs=1,
        image_size=16,
        runs_dir=str(tmp_path / "runs"),
        quiet=True,
    )
    log = (run.path / "train.log").read_text()
    assert "error: 1 file(s) appear in two splits" in log and "copy.jpg [val]" in log


def test_larger_than_memory_data_reads_from_the_mapped_cache(tmp_path, monkeypatch):
    from cnnkit.data.folder import decode_images

    root = make_photos(tmp_path / "photos", per_class=10)
    paths = sorted(root.rglob("*.*"))
    assert isinstance(decode_images(paths, 3, 24, memory_budget=1000).images, np.memmap)
    assert not isinstance(decode_images(paths, 3, 24).images, np.memmap)

    settings = dict(
        data=str(root),
        model="conv8-pool-gap",
        epochs=2,
        image_size=24,
        val_split=0.2,
        test_split=0,
        runs_dir=str(tmp_path / "r"),
        quiet=True,
    )
    in_memory = cnnkit.train(**settings)
    monkeypatch.setenv("CNNKIT_MEMORY_BUDGET", "1000")  # bytes: nothing fits
    mapped = cnnkit.train(**settings)
    assert "memory-mapped cache" in (mapped.path / "train.log").read_text()
    # the same seed gives the same training, wherever the images are read from
    for a, b in zip(in_memory.history, mapped.history, strict=True):
        assert (a["train_loss"], a["val_acc"]) == (b["train_loss"], b["val_acc"])


def test_imbalance_options(tmp_path):
    from cnnkit.train.loop import class_weights

    labels = torch.tensor([0] * 30 + [1] * 10)
    w = class_weights(labels, 2)
    assert w.tolist() == pytest.approx([40 / 60, 40 / 20])  # n / (k * count)
    per_image = w[labels]  # the balanced sampler's weights: each class drawn equally often
    assert per_image[labels == 0].sum() == pytest.approx(per_image[labels == 1].sum())
    root = make_photos(tmp_path / "photos", per_class=12)
    for f in sorted((root / "blue").iterdir())[3:]:
        f.unlink()  # blue: 3 images, the others 12
    run = cnnkit.train(
        data=str(root),
        model="conv8-gap",
        epochs=2,
        image_size=16,
        val_split=0,
        test_split=0,
        class_weights="auto",
        sampler="balanced",
        runs_dir=str(tmp_path / "r"),
        quiet=True,
    )
    assert len(run.history) == 2
    assert "imbalanced" in (run.path / "train.log").read_text()
