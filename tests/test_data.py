import gzip
import io
import os
import pickle
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.data import (
    BUILTINS,
    ChecksumError,
    DatasetNotFoundError,
    load_dataset,
    read_cifar,
    read_idx,
    stratified_split,
    stratified_subset,
)
from cnnkit.data.builtin import locate

MNIST_FILES = [f.name for f in BUILTINS["mnist"].files]


def copy_mnist(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(src / name, dest / name)
    return dest


def test_mnist_loads_with_stratified_validation_split(mnist_dir):
    data = load_dataset("mnist", val_split=0.1, seed=0)
    assert data.shape == (1, 28, 28)
    assert len(data.train) + len(data.val) == 60_000 and len(data.test) == 10_000
    assert data.train.images.dtype == torch.uint8
    # every class keeps its share: 10% of each class (+-1 for rounding) is in val
    full = torch.bincount(torch.cat([data.train.labels, data.val.labels]), minlength=10)
    val = torch.bincount(data.val.labels, minlength=10)
    assert ((val - full.double() * 0.1).abs() <= 1).all()
    assert data.mean == pytest.approx((0.1307,), abs=1e-3)


def test_checksum_mismatch_is_refused(mnist_dir, tmp_path):
    d = copy_mnist(mnist_dir, tmp_path / "mnist")
    bad = d / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(bad.read_bytes()))
    data[100] = (data[100] + 1) % 10  # one wrong label
    bad.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        load_dataset("mnist", data_dir=tmp_path)


def test_recompressed_official_content_is_accepted(mnist_dir, tmp_path):
    # Redistributors (Debian) recompress the files: other gzip bytes, same content.
    d = copy_mnist(mnist_dir, tmp_path / "mnist")
    f = d / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes()), compresslevel=1, mtime=0))
    data = load_dataset("mnist", data_dir=tmp_path, val_split=0)
    assert len(data.test) == 10_000


def test_offline_error_lists_every_place_searched(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("CNNKIT_DATA", os.pathsep.join([str(a), str(b)]))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", data_dir=tmp_path / "explicit")
    msg = str(e.value)
    for place in [
        tmp_path / "explicit" / "cifar10",
        a / "cifar10",
        b / "cifar10",
        "/usr/share/datasets/cifar10",
        Path(os.environ["XDG_CACHE_HOME"]) / "cnnkit/datasets/cifar10",
    ]:
        assert str(place) in msg
    assert "CNNKIT_OFFLINE" in msg and "Fix:" in msg


def test_download_verifies_and_writes_atomically(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("CNNKIT_OFFLINE")
    monkeypatch.setenv("CNNKIT_DATA", "")
    spec = replace(BUILTINS["mnist"], mirrors=(mnist_dir.as_uri() + "/",))
    files = locate(spec)
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "cnnkit" / "datasets" / "mnist"
    assert sorted(files) == sorted(MNIST_FILES)
    assert all(p.parent == cache for p in files.values())
    assert sorted(os.listdir(cache)) == sorted(MNIST_FILES)  # no partial files left

    # A mirror serving a corrupt file: refused, and nothing lands in the cache.
    bad_mirror = tmp_path / "mirror"
    copy_mnist(mnist_dir, bad_mirror)
    (bad_mirror / "train-labels-idx1-ubyte.gz").write_bytes(b"not the real file")
    shutil.rmtree(cache)
    spec = replace(spec, mirrors=(bad_mirror.as_uri() + "/",))
    with pytest.raises(DatasetNotFoundError, match="checksum mismatch"):
        locate(spec)
    assert "train-labels-idx1-ubyte.gz" not in os.listdir(cache)
    assert not [f for f in os.listdir(cache) if f.endswith(".part")]


def test_idx_reader_rejects_truncated_file(tmp_path):
    f = tmp_path / "x-idx3-ubyte"
    header = (0x00000803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (5, 2, 2))
    f.write_bytes(header + bytes(5 * 4))
    assert read_idx(f).shape == (5, 2, 2)
    f.write_bytes(header + bytes(7))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(f)


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar10(path: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int]]:
    """A CIFAR-10 tarball in the official layout, with known pixels and labels."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        names = [
            b"airplane",
            b"automobile",
            b"bird",
            b"cat",
            b"deer",
            b"dog",
            b"frog",
            b"horse",
            b"ship",
            b"truck",
        ]
        _add(
            tar,
            "cifar-10-batches-py/batches.meta",
            _pickle({b"label_names": names, b"num_cases_per_batch": per_batch}),
        )
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            lab = rng.integers(0, 10, per_batch).tolist()
            images.append(data)
            labels += lab
            _add(
                tar,
                f"cifar-10-batches-py/{name}",
                _pickle(
                    {
                        b"batch_label": name.encode(),
                        b"labels": lab,
                        b"data": data,
                        b"filenames": [b"x.png"] * per_batch,
                    }
                ),
            )
    return np.concatenate(images), labels


def test_cifar10_reader_on_official_format(tmp_path):
    images, labels = write_cifar10(tmp_path / "cifar-10-python.tar.gz")
    raw = read_cifar(tmp_path / "cifar-10-python.tar.gz")
    assert raw.train_images.shape == (20, 3, 32, 32) and raw.test_images.shape == (4, 3, 32, 32)
    assert raw.classes[0] == "airplane" and raw.classes[9] == "truck"
    assert raw.train_labels.tolist() == labels[:20] and raw.test_labels.tolist() == labels[20:]
    # The row layout is 1024 red, 1024 green, 1024 blue values, each row-major.
    first = images[0]
    assert raw.train_images[0, 0, 0, 1] == first[1]  # red, row 0, column 1
    assert raw.train_images[0, 1, 2, 0] == first[1024 + 64]  # green, row 2, column 0
    assert raw.train_images[0, 2, 31, 31] == first[3071]


def test_cifar100_reader_uses_fine_labels(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    fine = [f"class{i}".encode() for i in range(100)]
    with tarfile.open(path, "w:gz") as tar:
        _add(
            tar,
            "cifar-100-python/meta",
            _pickle({b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20}),
        )
        for split, n in (("train", 6), ("test", 3)):
            data = np.full((n, 3072), 7, dtype=np.uint8)
            _add(
                tar,
                f"cifar-100-python/{split}",
                _pickle(
                    {
                        b"data": data,
                        b"fine_labels": list(range(90, 90 + n)),
                        b"coarse_labels": [1] * n,
                    }
                ),
            )
    raw = read_cifar(path)
    assert len(raw.classes) == 100 and raw.classes[99] == "class99"
    assert raw.train_labels.tolist() == [90, 91, 92, 93, 94, 95]
    assert raw.test_images.shape == (3, 3, 32, 32) and int(raw.test_images.max()) == 7


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_cifar(path)


def test_stratified_split_is_seeded_disjoint_and_proportional():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, take = stratified_split(labels, 0.2, seed=1)
    assert sorted(torch.cat([keep, take]).tolist()) == list(range(100))
    assert torch.bincount(labels[take]).tolist() == [10, 6, 4]
    again, _ = stratified_split(labels, 0.2, seed=1)
    other, _ = stratified_split(labels, 0.2, seed=2)
    assert torch.equal(keep, again) and not torch.equal(keep, other)


def test_fashion_mnist_from_debian_package(fashion_dir):
    data = load_dataset("fashion-mnist", val_split=0)
    assert len(data.train) == 60_000 and len(data.test) == 10_000
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10


def test_limit_keeps_exactly_that_many_training_images_stratified(mnist_dir):
    # Rounding each class on its own gave 5,001 images for --limit 5000.
    full = load_dataset("mnist", val_split=0.1, seed=0)
    data = load_dataset("mnist", val_split=0.1, seed=0, limit=5000)
    assert len(data.train) == 5000
    assert len(data.val) == len(full.val) and len(data.test) == 10_000
    share = torch.bincount(full.train.labels, minlength=10).double() * 5000 / len(full.train)
    counts = torch.bincount(data.train.labels, minlength=10)
    assert ((counts - share).abs() < 1).all()


def test_stratified_subset_is_exact_for_every_size():
    labels = torch.tensor([0] * 7 + [1] * 11 + [2] * 13)
    for size in range(len(labels) + 3):
        keep = stratified_subset(labels, size, seed=3)
        assert len(keep) == min(size, len(labels)) and len(set(keep.tolist())) == len(keep)
        share = torch.bincount(labels).double() * min(size, len(labels)) / len(labels)
        assert ((torch.bincount(labels[keep], minlength=3) - share).abs() < 1).all()
    assert torch.equal(stratified_subset(labels, 10, 3), stratified_subset(labels, 10, 3))
