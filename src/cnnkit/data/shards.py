"""WebDataset tar shards: ``cnnkit datasets pack`` writes them, the reader here reads them.

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

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cnnkit.progress import progress

from .decode import GRAYSCALE_MODES, ImageReadError, open_image, resize_and_crop, to_mode
from .folder import (
    choose_input,
    display_name,
    find_data_path,
    list_images,
    map_in_workers,
    no_images_problem,
    not_a_file,
    plan_splits,
)
from .memory import ImageTensors

INDEX_FILE = "index.json"
FORMAT = "cnnkit.shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DEFAULT_SHARD_SIZE = 256_000_000
DEFAULT_QUALITY = 90
# Below this many files a pack decodes in this process: starting worker processes costs
# more than it saves.
WORKERS_FROM = 512
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TAR_BLOCK = 512


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


# ---------------------------------------------------------------- writing

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes from '500MB', '1GB', '2GiB', '200000000'."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", str(text), re.IGNORECASE)
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(
            f"--shard-size: cannot read '{text}' as a size; give bytes (200000000) or a "
            "number with KB, MB or GB (500MB, 1GB)"
        )
    unit = m.group(2).lower()
    scale = 1024 ** "kmgt".index(unit) * 1024 if m.group(3) else _SIZE_UNITS[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise ValueError(f"--shard-size: {text} is no size; give at least 1 byte, e.g. 256MB")
    return size


def _reason(e: Exception) -> str:
    if isinstance(e, ImageReadError):
        return display_name(str(e).removeprefix("image data: "))
    return display_name(f"cannot decode image ({type(e).__name__}: {e})")


def _encode(im, max_side: int | None, quality: int | None) -> tuple[str, bytes] | None:
    """Re-encoded bytes when asked (``quality``) or needed (larger than ``max_side``)."""
    from PIL import Image

    resize = max_side is not None and max(im.size) > max_side
    if not resize and quality is None:
        return None
    gray = im.mode in GRAYSCALE_MODES
    im = to_mode(im, 1 if gray else 3)
    if resize:
        w, h = im.size
        scale = max_side / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    if gray:  # JPEG has no advantage on the small grayscale images this mostly is
        im.save(buf, "PNG")
        return "png", buf.getvalue()
    im.save(buf, "JPEG", quality=quality or DEFAULT_QUALITY)
    return "jpg", buf.getvalue()


def _prepare_file(path: Path, max_side: int | None, quality: int | None):
    """(ext, bytes, '') for a file that decodes, ('', b'', why) for one that does not."""
    from PIL import Image

    why = not_a_file(path)
    if why:
        return "", b"", why
    try:
        data = path.read_bytes()
        im = open_image(data)  # every pixel decoded: .verify() misses truncated data
        with Image.open(io.BytesIO(data)) as header:  # open_image's copy has no format
            ext = _FORMAT_EXT.get(header.format, (header.format or "img").lower())
        encoded = _encode(im, max_side, quality)
    except OSError as e:
        return "", b"", f"cannot be read ({e.strerror or e})"
    except Exception as e:  # any decoder failure: report it, never end the pack
        return "", b"", _reason(e)
    return (*encoded, "") if encoded else (ext, data, "")


def _prepare_array(a: np.ndarray, max_side: int | None) -> tuple[str, bytes]:
    """A built-in set's uint8 (C, H, W) image as PNG (lossless)."""
    from PIL import Image

    im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    if max_side is not None and max(im.size) > max_side:
        w, h = im.size
        scale = max_side / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "png", buf.getvalue()


class _SplitWriter:
    """Samples of one split into ``{split}-%06d.tar`` files of at most ``max_count``
    samples and (unless one sample alone is larger) ``max_bytes`` bytes."""

    def __init__(self, folder: Path, split: str, classes: list[str], max_bytes, max_count):
        self.folder, self.split, self.classes = folder, split, classes
        self.max_bytes, self.max_count = max_bytes, max_count
        self.shards: list[dict] = []
        self.class_counts = [0] * len(classes)
        self.count = 0
        self._file = self._tar = None
        self._bytes = 0

    def write(self, ext: str, data: bytes, label: int, file: str) -> None:
        from webdataset import TarWriter

        key = f"{self.split}-{self.count:08d}"
        meta = json.dumps({"file": file, "label": self.classes[label]}).encode()
        members = {ext: data, "cls": str(label).encode(), "json": meta}
        # tar: a 512-byte header per member, its data padded to 512-byte blocks
        size = sum(_TAR_BLOCK + -(-len(v) // _TAR_BLOCK) * _TAR_BLOCK for v in members.values())
        shard = self.shards[-1] if self.shards else None
        full = shard is not None and (
            shard["count"] >= self.max_count
            or (self._bytes + size + 2 * 10240 > self.max_bytes)  # + the tar's end blocks
        )
        if shard is None or full:
            self._close()
            shard = {"name": f"{self.split}-{len(self.shards):06d}.tar", "count": 0, "bytes": 0}
            self.shards.append(shard)
            self._file = open(self.folder / shard["name"], "wb")  # noqa: SIM115 (see _close)
            # A whole-second mtime: a float one costs a 1 KB pax header per member.
            self._tar = TarWriter(self._file, encoder=False, mtime=int(time.time()))
            self._bytes = 0
        self._tar.write({"__key__": key, **members})
        self._bytes += size
        shard["count"] += 1
        self.class_counts[label] += 1
        self.count += 1

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1]["bytes"] = (self.folder / self.shards[-1]["name"]).stat().st_size
        self._tar = self._file = None

    def close(self) -> dict:
        self._close()
        return {"count": self.count, "class_counts": self.class_counts, "shards": self.shards}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file; give a folder (new or empty) for the shards")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty; give a new or empty folder, or pass --overwrite to replace "
            "the shard set in it"
        )


def _check_options(val_split, test_split, max_count, max_side, quality) -> None:
    for flag, value in (("--val-split", val_split), ("--test-split", test_split)):
        if not 0 <= value < 1:
            raise ValueError(f"{flag} must be in [0, 1), got {value}")
    if val_split + test_split >= 1:
        raise ValueError("--val-split + --test-split must leave images for training (< 1)")
    for flag, value in (("--max-count", max_count), ("--max-side", max_side)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if quality is not None and not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100 (JPEG quality), got {quality}")


def _shuffled(items: list, seed: int, split: str) -> list:
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(items))
    return [items[i] for i in order]


def _pack_builtin(name, data_dir, val_split, seed, max_side, writers_for) -> dict:
    import torch

    from .builtin import builtin, load_builtin
    from .memory import stratified_split

    spec = builtin(name)
    raw = load_builtin(spec.name, data_dir)  # the arrays load_dataset wraps (no stats needed)
    images = {"train": raw.train_images, "test": raw.test_images}
    labels = {"train": raw.train_labels.tolist(), "test": raw.test_labels.tolist()}
    # The validation images as load_dataset(val_split=..., seed=...) takes them, by their
    # index in the official training set (which names each sample's source).
    items = {"train": [("train", i) for i in range(len(labels["train"]))]}
    if val_split > 0:
        keep, take = stratified_split(torch.from_numpy(raw.train_labels.copy()), val_split, seed)
        items = {"train": [("train", i) for i in keep.tolist()]}
        items["val"] = [("train", i) for i in take.tolist()]
    items["test"] = [("test", i) for i in range(len(labels["test"]))]
    writers = writers_for(list(raw.classes), [s for s in SPLITS if items.get(s)])
    for split, writer in writers.items():
        with progress(f"packing {split}", len(items[split]), "images") as advance:
            for source, i in _shuffled(items[split], seed, split):
                ext, encoded = _prepare_array(images[source][i], max_side)
                writer.write(ext, encoded, labels[source][i], f"{spec.name}/{source}/{i}")
                advance(1)
    c, h, _ = raw.train_images.shape[1:]
    if max_side is not None:
        h = min(h, max_side)
    return {"classes": list(raw.classes), "channels": int(c), "image_size": int(h)}


def _pack_folder(listing, val_split, test_split, seed, max_side, quality, writers_for, skipped):
    root = listing.root
    skipped += [
        {
            "file": display_name(str(p.relative_to(root) if p.is_relative_to(root) else p)),
            "reason": why,
        }
        for p, why in listing.skipped
    ]
    splits = plan_splits(listing, val_split, test_split, seed, [])
    order = [s for s in SPLITS if splits.get(s)]
    choice = choose_input([p for s in order for p, _ in splits[s]])
    writers = writers_for(listing.classes, order)
    for split, writer in writers.items():
        files = _shuffled(splits[split], seed, split)
        jobs = [(p, max_side, quality) for p, _ in files]
        workers = 0 if len(jobs) < WORKERS_FROM else None
        prepared = map_in_workers(_prepare_file, jobs, workers, label=f"packing {split}")
        for (path, label), (ext, data, why) in zip(files, prepared, strict=True):
            rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            if why:
                skipped.append({"file": display_name(rel), "reason": why})
            else:
                writer.write(ext, data, label, rel)
    if not any(w.count for w in writers.values()):
        raise ValueError(f"{display_name(str(root))}: none of the image files could be decoded")
    return {
        "classes": list(listing.classes),
        "channels": choice.channels,
        "image_size": choice.size,
    }


def pack(
    src: str,
    out: str | Path,
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    max_count: int | None = None,
    max_side: int | None = None,
    quality: int | None = None,
    val_split: float = 0.1,
    test_split: float = 0.1,
    seed: int = 0,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a data set (built-in name, folder or CSV list) as a shard set in ``out``;
    returns its index, plus ``seconds`` and ``bytes`` (see the module docstring).

    ``quality``: re-encode every image as JPEG of that quality (PNG for grayscale);
    ``max_side``: re-encode (at ``quality``, default 90) images whose longer side is larger,
    downsized to it. Otherwise the files' bytes are stored unchanged."""
    from . import is_builtin

    start = time.perf_counter()
    max_bytes = parse_size(shard_size)
    _check_options(val_split, test_split, max_count, max_side, quality)
    builtin_set = is_builtin(src)
    listing = None if builtin_set else list_images(src)
    if listing is not None and (empty := no_images_problem(listing)):
        raise ValueError(empty)  # a missing or empty source is refused before OUT is touched
    out = Path(out)
    _check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    skipped: list[dict] = []
    writers: dict[str, _SplitWriter] = {}

    def writers_for(classes: list[str], splits: list[str]) -> dict[str, _SplitWriter]:
        count = max_count or 10**12
        writers.update({s: _SplitWriter(partial, s, classes, max_bytes, count) for s in splits})
        return writers

    try:
        if builtin_set:
            facts = _pack_builtin(src, data_dir, val_split, seed, max_side, writers_for)
        else:
            args = (val_split, test_split, seed, max_side, quality, writers_for, skipped)
            facts = _pack_folder(listing, *args)
        splits = {s: w.close() for s, w in writers.items()}
        index = {
            "format": f"{FORMAT}/{FORMAT_VERSION}",
            **facts,
            "source": str(src),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seed": seed,
            "val_split": val_split,
            "test_split": None if builtin_set else test_split,
            "splits": splits,
            "skipped": skipped,
        }
        _publish(partial, out, index)
    finally:
        for w in writers.values():
            w._close()
        shutil.rmtree(partial, ignore_errors=True)
    total = sum(sh["bytes"] for s in index["splits"].values() for sh in s["shards"])
    return {**index, "bytes": total, "seconds": time.perf_counter() - start}


def _publish(partial: Path, out: Path, index: dict) -> None:
    """Move the new shards into ``out``, replacing an old set, and write index.json last."""
    old = out / INDEX_FILE
    if old.exists():
        old.unlink()  # first: until the new index is written, no set claims to be complete
    for f in out.iterdir():
        if re.fullmatch(r"(train|val|test)-\d{6}\.tar", f.name) and f.is_file():
            f.unlink()
        elif f.name.startswith(".partial-") and f != partial and f.is_dir():
            shutil.rmtree(f, ignore_errors=True)  # left by a pack that was killed
    for f in sorted(partial.iterdir()):
        os.replace(f, out / f.name)
    tmp = partial / INDEX_FILE
    with open(tmp, "w") as handle:
        json.dump(index, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out / INDEX_FILE)
