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
    pred = run.predict(root / "green" / "green4.jpg", reject=False)[0]  # the class, always
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


def test_limit_on_a_folder_is_exact(tmp_path):
    root = make_photos(tmp_path / "photos", per_class=12)
    data = load_folder(root, image_size=16, val_split=0.1, test_split=0.1, limit=8)
    assert len(data.train) == 8 and len(data.files["train"]) == 8
    assert sorted(torch.bincount(data.train.labels).tolist()) == [2, 3, 3]


def test_a_class_folder_named_in_latin1_gets_a_valid_text_name(tmp_path, capsys):
    from cnnkit.cli import main

    root = make_photos(tmp_path / "photos", per_class=4)
    # A folder and a file named in Latin-1: bytes that are not UTF-8 (é is 0xe9)
    red = os.path.join(os.fsencode(root), b"caf\xe9")
    os.rename(os.fsencode(root / "red"), red)
    os.rename(os.path.join(red, b"red1.jpg"), os.path.join(red, b"cr\xe8me.jpg"))
    data = load_folder(root, image_size=16, val_split=0, test_split=0)
    assert data.classes == ["blue", "caf\\xe9", "green"]
    for text in [*data.classes, *data.notes]:
        text.encode("utf-8")  # raises on the lone surrogates os.fsdecode makes of 0xe9
    assert len(data.train) == 12  # the files are read through their real paths
    reds = data.train.images[data.train.labels == 1].float().mean(dim=(0, 2, 3))
    assert reds[0] > 150 and reds[1] < 80
    # a run's split file keeps the real paths: reloading it finds the same images
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"root": data.root, "classes": data.classes, **data.files}))
    again = load_folder(root, image_size=16, split_file=split)
    assert again.classes == data.classes and torch.equal(again.train.images, data.train.images)
    # the doctor prints its findings (every image here is tiny) without a UnicodeEncodeError
    assert main(["datasets", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "caf\\xe9" in out and "cr\\xe8me.jpg" in out


def make_digits(root, per_class: int = 12, side: int = 8):
    """Class folders of tiny grayscale PNGs (like scikit-learn's 8x8 digits as files): a
    dark and a light class, each image with its own noise."""
    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("light", 200)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = np.clip(level + rng.integers(-30, 30, (side, side)), 0, 255).astype(np.uint8)
            Image.fromarray(a, "L").save(root / name / f"{name}{i}.png")
    return root


def test_small_grayscale_images_get_one_channel_and_a_small_input(tmp_path):
    root = make_digits(tmp_path / "digits")
    data = load_folder(root, val_split=0, test_split=0)
    assert data.shape == (1, 16, 16)  # not 3x128x128: 16x upscaled colour copies
    assert data.notes[0] == (
        "images are grayscale and 8x8 (median): input 1x16x16 (--image-size to change)"
    )
    light = data.train.images[data.train.labels == 1].float().mean()
    assert light == pytest.approx(200, abs=10)
    sized = load_folder(root, image_size=24, val_split=0, test_split=0)
    assert sized.shape == (1, 24, 24)
    assert sized.notes[0] == "images are grayscale: input 1x24x24 (--image-size to change)"
    rgb = load_folder(root, channels=3, val_split=0, test_split=0)
    assert rgb.shape == (3, 16, 16) and "grayscale" not in rgb.notes[0]


def test_the_inferred_size_follows_the_median_shorter_side(tmp_path):
    photos = make_photos(tmp_path / "photos", per_class=5)  # 40-44 x 30-34 colour photos
    data = load_folder(photos, val_split=0, test_split=0)
    assert data.shape == (3, 32, 32)
    assert data.notes[0] == "images are 42x32 (median): input 3x32x32 (--image-size to change)"
    large = make_photos(tmp_path / "large", per_class=2, size=(150, 140))
    data = load_folder(large, val_split=0, test_split=0)
    assert data.shape == (3, 128, 128)  # the photo default, at most
    assert not any("(--image-size to change)" in n for n in data.notes)


def test_a_scratch_run_on_small_grayscale_images_trains_and_reloads_as_chosen(tmp_path):
    root = make_digits(tmp_path / "digits", per_class=10)
    run = cnnkit.train(
        data=str(root), model="seed-cnn", epochs=1, runs_dir=str(tmp_path / "runs"), quiet=True
    )
    assert (
        "images are grayscale and 8x8 (median): input 1x16x16"
        in (run.path / "train.log").read_text()
    )
    assert run.preprocessing["channels"] == 1 and run.data().shape == (1, 16, 16)
    assert run.predict(root / "light" / "light3.png", reject=False)[0].label in ("dark", "light")


def test_a_pretrained_backbone_keeps_its_size_and_three_channels(tmp_path):
    from cnnkit.config import Config
    from cnnkit.data.resolve import load_data, load_trained_data
    from cnnkit.models.weights import Preprocessing

    root = make_digits(tmp_path / "digits")
    cfg = Config.from_dict({"data": {"name": str(root), "val_split": 0, "test_split": 0}})
    data = load_data(cfg, Preprocessing(size=(48, 48), crop_pct=1.0))
    assert data.shape == (3, 48, 48)
    assert not any("grayscale" in n for n in data.notes)
    # reloading a run uses its checkpoint's channels and size, whatever the images are
    saved = {"size": [40, 40], "channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3}
    again = load_trained_data(cfg, saved, tmp_path / "no-split.json")
    assert again.shape == (3, 40, 40) and again.mean == (0.5,) * 3


def test_the_header_sample_spans_every_class(tmp_path, monkeypatch):
    from cnnkit.data import folder

    monkeypatch.setattr(folder, "HEADER_SAMPLE", 4)
    paths = []
    for i in range(10):  # grouped as a listing is: seven grayscale files, then three colour
        paths.append(tmp_path / f"{i}.png")
        Image.new("L" if i < 7 else "RGB", (20, 20)).save(paths[-1])
    assert folder.choose_input(paths).channels == 3
    assert folder.choose_input(paths[:7]).channels == 1


def test_a_latin1_class_name_trains_evaluates_reports_and_predicts(tmp_path, capsys):
    """Undecodable folder names once broke the training log, the report's plots and every
    prediction; the escaped name now goes through the whole workflow."""
    import cnnkit

    root = make_photos(tmp_path / "photos", per_class=9)
    os.rename(os.fsencode(root / "red"), os.path.join(os.fsencode(root), b"caf\xe9"))
    run = cnnkit.train(
        data=str(root),
        model="conv8-pool-fc16",
        epochs=1,
        image_size=16,
        runs_dir=str(tmp_path / "runs"),
        quiet=True,
    )
    assert "caf\\xe9" in run.classes
    assert "caf\\xe9" in (run.path / "train.log").read_text(encoding="utf-8")
    report = run.evaluate()
    assert "caf\\xe9" in report.classes
    html, _ = run.report()
    assert "caf\\xe9" in html.read_text(encoding="utf-8")
    photo = next((root / os.fsdecode(b"caf\xe9")).iterdir())
    prediction = run.predict([photo], reject=False)[0]
    assert prediction.label in run.classes and "caf\\xe9" in prediction.source
    print(prediction.source)  # printable: no UnicodeEncodeError
