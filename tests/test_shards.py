"""WebDataset shards: `cnnkit datasets pack` writes them; the reader gives back the source."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runs import write_shard_set
from cnnkit.cli import main
from cnnkit.data.decode import ImageReadError
from cnnkit.data.folder import decode_one, load_folder
from cnnkit.data.pack import pack, parse_size
from cnnkit.data.shards import (
    INDEX_FILE,
    decode_sample,
    is_shard_set,
    iter_shard,
    load_split,
    read_shard_set,
)

CLASSES = ("ant", "bee", "cow")


@pytest.fixture()
def photos(tmp_path):
    """3 classes x 10 small RGB images, PNG and JPEG, of different sizes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(10):
            h, w = 20 + i, 24 + 2 * c
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            a[..., c] = 255  # a class colour
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(a).save(root / name / f"{i:02d}.{ext}")
    return root


def test_round_trip_equals_the_folder_loader(photos, tmp_path):
    out = tmp_path / "shards"
    index = pack(str(photos), out, max_count=7, seed=3)
    assert is_shard_set(str(out)) and is_shard_set(str(out / INDEX_FILE))
    assert not is_shard_set(str(photos))
    shards = read_shard_set(str(out))
    assert shards.classes == list(CLASSES) and shards.channels == 3
    data = load_folder(photos, seed=3)  # same split, same size (choose_input's)
    size = data.input_size[0]
    assert shards.image_size == size and index["image_size"] == size
    expected_counts = {"train": 24, "val": 3, "test": 3}
    for split, n in expected_counts.items():
        part = shards.splits[split]
        assert part.count == n and sum(part.counts) == n
        assert part.counts == [min(7, n - i) for i in range(0, n, 7)]  # full shards, then rest
        assert [Path(u).name for u in part.urls] == [
            f"{split}-{i:06d}.tar" for i in range(len(part.counts))
        ]
        on_disk = [sum(1 for _ in iter_shard(u)) for u in part.urls]
        assert on_disk == part.counts

        tensors, keys = load_split(shards, split, 3, size)
        assert keys == [f"{split}-{i:08d}" for i in range(n)]
        reference = data.split(split)
        assert Counter(tensors.labels.tolist()) == Counter(reference.labels.tolist())
        assert part.class_counts == torch.bincount(reference.labels, minlength=3).tolist()
        # Each sample's pixels equal the folder loader's decoding of the file it names.
        by_file = dict(zip((f for f, _ in data.files[split]), reference.images, strict=True))
        files = [_meta(out, key)["file"] for key in keys]
        assert sorted(files) == sorted(by_file)
        for image, file in zip(tensors.images, files, strict=True):
            assert torch.equal(image, by_file[file])
    # the shuffled order mixes the classes inside the first train shard
    first = [label for _, _, label in iter_shard(shards.splits["train"].urls[0])]
    assert len(set(first)) == 3
    assert index["skipped"] == [] and index["source"] == str(photos)


def _meta(out: Path, key: str) -> dict:
    split = key.split("-")[0]
    for tar_path in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            try:
                return json.loads(tar.extractfile(f"{key}.json").read())
            except KeyError:
                continue
    raise KeyError(key)


def test_stored_bytes_are_the_files_unless_re_encoded(photos, tmp_path):
    pack(str(photos), tmp_path / "a", seed=0)
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        names = tar.getnames()
        member = next(n for n in names if n.endswith((".jpg", ".png")))
        key = member.split(".")[0]
        file = json.loads(tar.extractfile(f"{key}.json").read())["file"]
        assert tar.extractfile(member).read() == (photos / file).read_bytes()
        assert names[:3] == [f"{key}.cls", member, f"{key}.json"]

    pack(str(photos), tmp_path / "b", max_side=16)
    stored = [d for u in sorted((tmp_path / "b").glob("*.tar")) for _, d, _ in iter_shard(str(u))]
    assert len(stored) == 30
    for data in stored:
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG" and max(im.size) <= 16


def test_corrupt_files_are_reported_and_left_out(photos, tmp_path, capsys):
    bad = photos / "bee" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(1).bytes(300))
    good = photos / "ant" / "00.jpg"
    truncated = photos / "ant" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    assert main(["datasets", "pack", str(photos), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 file(s)" in out and "bee/broken.jpg" in out and "truncated.jpg" in out
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    skipped = {s["file"]: s["reason"] for s in index["skipped"]}
    assert set(skipped) == {"bee/broken.jpg", "ant/truncated.jpg"}
    assert "not an image" in skipped["bee/broken.jpg"]
    assert sum(s["count"] for s in index["splits"].values()) == 30


def test_a_bad_sample_inside_a_shard_is_skipped_by_key(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    write_shard_set(
        tmp_path,
        [
            [
                ("train-00000000.png", png),
                ("train-00000000.cls", b"1"),
                ("train-00000001.png", png[:40]),  # truncated image
                ("train-00000001.cls", b"0"),
                ("train-00000002.cls", b"0"),  # no image at all
                ("train-00000003.png", png),
                ("train-00000003.cls", b"0"),
            ]
        ],
        ["a", "b"],
        1,
        8,
    )
    shards = read_shard_set(str(tmp_path))
    with pytest.warns(UserWarning) as caught:
        tensors, keys = load_split(shards, "train", 1, 8)
    assert keys == ["train-00000000", "train-00000003"]
    assert tensors.labels.tolist() == [1, 0] and int(tensors.images.min()) == 200
    messages = " ".join(str(w.message) for w in caught)
    assert "train-00000001" in messages and "train-00000002 has no image" in messages
    with pytest.raises(ImageReadError):
        decode_sample(png[:40], 1, 8)


def test_a_newer_or_foreign_index_is_refused(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": "cnnkit.shards/9"}))
    with pytest.raises(ValueError, match="newer than this cnnkit reads.*upgrade"):
        read_shard_set(str(tmp_path))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": "other"}))
    assert not is_shard_set(str(tmp_path))
    with pytest.raises(ValueError, match="not a cnnkit shard index"):
        read_shard_set(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cnnkit datasets pack"):
        read_shard_set(str(tmp_path / "nothing"))


def test_shard_sizes_parse():
    assert parse_size("500MB") == 500_000_000 and parse_size("1GB") == 10**9
    assert parse_size("200000000") == 200_000_000 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError, match="--shard-size: cannot read '12 parsecs'"):
        parse_size("12 parsecs")


def test_cli_errors_are_one_line(photos, tmp_path, capsys):
    def error(*argv) -> str:
        assert main(["datasets", "pack", *map(str, argv)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "not found" in error(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    assert "no images found" in error(tmp_path / "empty", tmp_path / "o")
    assert not (tmp_path / "o").exists()  # refused before OUT was made
    assert "--shard-size" in error(photos, tmp_path / "o", "--shard-size", "lots")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    assert "--overwrite" in error(photos, tmp_path / "full")
    assert "usage: cnnkit datasets pack SRC OUT" in error(photos)
    # --overwrite replaces a shard set and keeps other files
    assert main(["datasets", "pack", str(photos), str(tmp_path / "full"), "--overwrite"]) == 0
    assert (tmp_path / "full" / "x.txt").read_text() == "keep"
    assert is_shard_set(str(tmp_path / "full"))
    assert not list((tmp_path / "full").glob(".partial-*"))


def test_mnist_packs_losslessly(mnist_dir, tmp_path):
    from cnnkit.data import load_dataset
    from cnnkit.data.builtin import load_builtin

    index = pack("mnist", tmp_path / "m", max_count=20000, seed=0)
    data = load_dataset("mnist", val_split=0.1, seed=0)
    shards = read_shard_set(str(tmp_path / "m"))
    for split in ("train", "val", "test"):
        assert shards.splits[split].count == len(data.split(split))
        assert all(n <= 20000 for n in shards.splits[split].counts)
    assert [s["name"] for s in index["splits"]["train"]["shards"]] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert shards.channels == 1 and shards.image_size == 28
    official = load_builtin("mnist")  # the official arrays the validation images come from
    url = shards.splits["val"].urls[0]
    files = {}
    with tarfile.open(url, "r|") as tar:  # the first samples' .json, read in one pass
        for member in tar:
            if member.name.endswith(".json"):
                files[member.name[: -len(".json")]] = json.load(tar.extractfile(member))["file"]
            if len(files) == 5:
                break
    assert len(files) == 5
    for key, data_bytes, label in iter_shard(url):
        if key not in files:
            break
        source, i = files[key].split("/")[1], int(files[key].split("/")[2])
        assert source == "train"  # validation images come out of the official train set
        image = decode_sample(data_bytes, 1, 28)
        assert np.array_equal(image, official.train_images[i])
        assert label == int(official.train_labels[i])


def test_decode_matches_the_folder_cache(photos):
    for f in sorted(photos.rglob("*.jpg"))[:3]:
        assert np.array_equal(decode_sample(f.read_bytes(), 3, 16), decode_one(f, 3, 16))


def test_a_brace_pattern_of_shards_names_the_set_they_are_in(photos, tmp_path):
    out = tmp_path / "shards"
    pack(str(photos), out, max_count=4)
    pattern = str(out / "train-{000000..000099}.tar")
    assert is_shard_set(pattern)
    shards = read_shard_set(pattern)
    assert shards.splits["train"].count == read_shard_set(str(out)).splits["train"].count
    assert not is_shard_set(str(tmp_path / "elsewhere" / "train-{000000..000001}.tar"))


def test_the_doctor_checks_a_shard_set(photos, tmp_path):
    from cnnkit.data.doctor import check_dataset

    # the same photo in train/ and test/: a leak the doctor must find inside the shards too
    (photos / "test" / "ant").mkdir(parents=True)
    for name in CLASSES:
        (photos / "train" / name).mkdir(parents=True)
        for f in sorted((photos / name).iterdir()):
            f.rename(photos / "train" / name / f.name)
        (photos / name).rmdir()
    leaked = photos / "train" / "ant" / "00.jpg"
    (photos / "test" / "ant" / "leak.jpg").write_bytes(leaked.read_bytes())
    out = tmp_path / "shards"
    pack(str(photos), out, max_count=8)
    on_shards = check_dataset(str(out))
    on_folder = check_dataset(photos)
    assert on_shards.classes == on_folder.classes
    assert on_shards.counts["test"] == on_folder.counts["test"] == [1, 0, 0]
    assert sum(map(sum, on_shards.counts.values())) == sum(map(sum, on_folder.counts.values()))
    leaks = [f for f in on_shards.findings if f.check == "exact-duplicates-across-splits"]
    assert len(leaks) == 1 and "[test]" in leaks[0].files[0] and "[train]" in leaks[0].files[0]
    assert "test-000000.tar:test-00000000" in leaks[0].files[0]


def test_the_doctor_names_a_corrupt_sample_of_a_shard(tmp_path):
    from cnnkit.data.doctor import check_dataset

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 99, np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    write_shard_set(
        tmp_path,
        [
            [
                ("train-00000000.png", png),
                ("train-00000000.cls", b"0"),
                ("train-00000001.png", png[:60]),  # truncated image
                ("train-00000001.cls", b"1"),
            ]
        ],
        ["a", "b"],
        1,
        32,
    )
    report = check_dataset(str(tmp_path))
    (unreadable,) = [f for f in report.findings if f.check == "unreadable"]
    assert unreadable.level == "error"
    assert unreadable.files[0].startswith("train-000000.tar:train-00000001")
    assert report.counts["train"] == [1, 0]  # as the samples are, not as the index says
