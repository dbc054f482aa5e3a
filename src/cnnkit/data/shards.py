"""WebDataset tar shards: the format, and the reader (``pack.py`` writes them: ``cnnkit
datasets pack``).

Data bigger than memory is streamed from tar shards in the WebDataset layout, the field's
standard: each sample is the tar members sharing a key, one after another. A shard set is a
folder (or a URL prefix) holding::

    train-000000.tar, train-000001.tar, ..., val-000000.tar, ..., test-000000.tar, ...
    index.json   (written last: a set with an index is complete)

Each sample is ``{key}.{ext}`` (the image: the original file's bytes unchanged, ``ext``
from its format; re-encoded to JPEG, or PNG for grayscale, only when ``--max-side`` or
``--quality`` asks for it), ``{key}.cls`` (the label index, ASCII) and ``{key}.json``
(``{"file": source path relative to the data root, or "mnist/train/12345", "label":
class name}``); ``key`` is ``{split}-{position:08d}``. ``index.json``::

    {"format": "cnnkit.shards/1", "classes": [...], "channels": 1 or 3,
     "image_size": suggested model input, "source": SRC as given, "created": ISO time,
     "seed": .., "val_split": .., "test_split": .. (null for built-in sets: their test
     set is the official one),
     "splits": {"train": {"count": N, "class_counts": [...],
                          "shards": [{"name": "train-000000.tar", "count": n, "bytes": b}]},
                "val": {...}, "test": {...}},
     "skipped": [{"file": ..., "reason": ...}]}

The split is made once, exactly as the folder loader makes it (``list_images`` +
``plan_splits``), and within a split the samples are written in a seeded shuffled order,
because a streaming reader reads shards whole: a shard of one class would make batches of
one class. Files that do not decode are found by decoding them, reported and left out.
"""

from __future__ import annotations

import json
import re
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.progress import progress

from .decode import ImageReadError, open_image, resize_and_crop
from .folder import (
    find_data_path,
)
from .memory import ImageTensors

INDEX_FILE = "index.json"
FORMAT = "cnnkit.shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class ShardSplit:
    """One split of a shard set: its samples, per class, and its shards in index order."""

    count: int
    class_counts: list[int]
    urls: list[str]  # full path or URL of each shard, in index order
    counts: list[int]  # samples per shard


@dataclass
class ShardSet:
    """A shard set's index.json, with the full location of every shard."""

    location: str  # the directory or URL prefix holding index.json (pipe: the index command)
    classes: list[str]
    channels: int
    image_size: int | None
    splits: dict[str, ShardSplit]
    index: dict  # the raw index.json


# ---------------------------------------------------------------- reading


def _is_url(name: str) -> bool:
    return bool(_URL.match(name)) or name.startswith("pipe:")


def _open_url(url: str):
    """A binary stream for a URL: webdataset.gopen's schemes (pipe:, http(s) via curl,
    gs via gsutil, ...), else fsspec (s3://, az://, ...) when it is installed."""
    from urllib.parse import urlparse

    from webdataset.gopen import gopen, gopen_schemes

    scheme = "pipe" if url.startswith("pipe:") else urlparse(url).scheme
    if scheme in gopen_schemes or scheme in ("", "file"):
        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError:
        raise ValueError(
            f"{url}: {scheme}:// URLs are read with fsspec, which is not installed; "
            f"pip install fsspec (and its {scheme} file system, e.g. s3fs for s3://), or give "
            "a pipe: command that writes the file to stdout"
        ) from None
    return fsspec.open(url, "rb").open()


def _index_location(name: str) -> tuple[str, str]:
    """(where index.json is, the location shards are named relative to)."""
    if name.startswith("pipe:"):  # a command; shards: the same command for another file
        return name, name
    if name.rstrip("/").endswith(INDEX_FILE):
        index = name.rstrip("/")
        return index, index[: -len(INDEX_FILE)].rstrip("/") or "."
    if re.search(r"\{\d+\.\.\d+\}", name) and name.endswith(".tar"):
        # a brace pattern of shards ('https://host/train-{000000..000099}.tar'): the set is
        # the folder they are in, whose index.json names every split's shards
        return _index_location(name.rsplit("/", 1)[0] if "/" in name else ".")
    if _is_url(name):
        return name.rstrip("/") + "/" + INDEX_FILE, name.rstrip("/")
    path = find_data_path(name)
    return str(path / INDEX_FILE), str(path)


def _shard_url(location: str, shard: str) -> str:
    if location.startswith("pipe:"):
        return location.replace(INDEX_FILE, shard)
    if _is_url(location):
        return f"{location}/{shard}"
    return str(Path(location) / shard)


def _read_index(index: str) -> dict:
    if _is_url(index):
        stream = _open_url(index)
        try:
            data = stream.read()
        finally:
            stream.close()
    else:
        data = Path(index).read_bytes()
    return json.loads(data)


def _is_ours(index) -> bool:
    return isinstance(index, dict) and str(index.get("format", "")).startswith(f"{FORMAT}/")


def is_shard_set(name: str) -> bool:
    """True for a shard set: a local folder with our index.json, a path or URL ending in
    index.json, or a URL prefix whose index.json opens. Local folders cost a stat (and a
    small read where an index.json is); only URLs touch the network."""
    name = str(name)
    if name.startswith("pipe:") and INDEX_FILE not in name:
        return False
    index, _ = _index_location(name)
    if not _is_url(index) and not Path(index).is_file():
        return False
    try:
        return _is_ours(_read_index(index))
    except Exception:  # unreachable, unreadable or not JSON: not a shard set
        return False


def read_shard_set(name: str) -> ShardSet:
    """The shard set at ``name`` (a folder, a path or URL of its index.json, or a URL
    prefix); a clear error when there is none, or it is not ours, or newer than this
    cnnkit."""
    name = str(name)
    if name.startswith("pipe:") and INDEX_FILE not in name:
        raise ValueError(
            f"{name}: a pipe: shard set is the command that prints its {INDEX_FILE} "
            f"(e.g. 'pipe:aws s3 cp s3://bucket/set/{INDEX_FILE} -'); its shards are read "
            f"with the same command, {INDEX_FILE} replaced by the shard's name"
        )
    index_at, location = _index_location(name)
    try:
        index = _read_index(index_at)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{index_at}: no shard set there (no {INDEX_FILE}); make one with "
            "'cnnkit datasets pack SRC OUT'"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_at}: not a cnnkit shard index (not JSON: {e})") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{index_at}: cannot read the shard index ({e})") from None
    if not _is_ours(index):
        raise ValueError(
            f"{index_at}: not a cnnkit shard index (format {index.get('format')!r} where "
            f"'{FORMAT}/{FORMAT_VERSION}' was expected); make one with "
            "'cnnkit datasets pack SRC OUT'"
        )
    version = index["format"].split("/", 1)[1]
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{index_at}: shard format {index['format']} is newer than this cnnkit reads "
            f"({FORMAT}/{FORMAT_VERSION}); upgrade cnnkit (pip install -U cnnkit)"
        )
    splits = {
        s: ShardSplit(
            count=int(info["count"]),
            class_counts=[int(c) for c in info["class_counts"]],
            urls=[_shard_url(location, shard["name"]) for shard in info["shards"]],
            counts=[int(shard["count"]) for shard in info["shards"]],
        )
        for s, info in index["splits"].items()
    }
    return ShardSet(
        location=location,
        classes=list(index["classes"]),
        channels=int(index["channels"]),
        image_size=index.get("image_size"),
        splits=splits,
        index=index,
    )


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lstrip(".").lower() for ext in Image.registered_extensions()} | {"jpg"}


def _sample(url: str, key: str, members: dict[str, bytes], image_exts: set[str]):
    image = next((members[e] for e in members if e.lower() in image_exts), None)
    if image is None or "cls" not in members:
        missing = "image" if image is None else ".cls label"
        warnings.warn(f"{url}: sample {key} has no {missing}; skipped", stacklevel=3)
        return None
    try:
        return key, image, int(members["cls"].strip())
    except ValueError:
        warnings.warn(f"{url}: sample {key} has no integer label in .cls; skipped", stacklevel=3)
        return None


def iter_shard(url: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, image bytes, label) for each sample of one tar, in order. Local files are read
    with tarfile, URLs through webdataset.gopen (pipe:, http(s) via curl) or fsspec. A
    sample without an image or a .cls label is skipped with a warning naming its key."""
    stream = _open_url(url) if _is_url(url) else open(url, "rb")  # noqa: SIM115 (closed below)
    image_exts = _image_extensions()
    key, members = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                # WebDataset: the key is the path up to the first dot of the file name
                folder, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                k = f"{folder}/{stem}" if folder else stem
                if k != key:
                    if key is not None and (sample := _sample(url, key, members, image_exts)):
                        yield sample
                    key, members = k, {}
                members[ext] = tar.extractfile(info).read()
            if key is not None and (sample := _sample(url, key, members, image_exts)):
                yield sample
    except tarfile.TarError as e:
        raise ValueError(
            f"{url}: the shard is truncated or not a tar file ({e}); pack the data set again"
        ) from None
    finally:
        stream.close()


def decode_sample(data: bytes, channels: int, size: int) -> np.ndarray:
    """Image bytes -> uint8 (C, size, size), decoded exactly as the folder cache decodes a
    file; raises ImageReadError for an image that does not decode."""
    im = resize_and_crop(open_image(data, draft=size), channels, size)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_split(
    shards: ShardSet, split: str, channels: int, size: int
) -> tuple[ImageTensors, list[str]]:
    """Every sample of a split decoded into memory, in index order, and the keys kept.
    A sample that does not decode is skipped with a warning naming its key."""
    import torch

    if split not in shards.splits:
        raise ValueError(
            f"{shards.location}: no '{split}' split in this shard set (it has "
            f"{', '.join(shards.splits) or 'none'})"
        )
    part = shards.splits[split]
    images, labels, keys = [], [], []
    with progress(f"decoding {split} shards", part.count, "images") as advance:
        for url in part.urls:
            for key, data, label in iter_shard(url):
                try:
                    images.append(decode_sample(data, channels, size))
                except ImageReadError as e:
                    reason = str(e).removeprefix("image data: ")
                    warnings.warn(f"{url}: sample {key} skipped: {reason}", stacklevel=2)
                    continue
                finally:
                    advance(1)
                labels.append(label)
                keys.append(key)
    stacked = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
    tensors = ImageTensors(torch.from_numpy(stacked), torch.tensor(labels, dtype=torch.long))
    return tensors, keys
