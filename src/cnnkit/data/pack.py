"""``cnnkit datasets pack``: a data set (built-in, folder or CSV list) written as a shard
set in the WebDataset layout, the format shards.py describes and reads.

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
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cnnkit.progress import progress

from .decode import GRAYSCALE_MODES, ImageReadError, open_image, to_mode
from .folder import (
    choose_input,
    display_name,
    list_images,
    map_in_workers,
    no_images_problem,
    not_a_file,
    plan_splits,
)
from .shards import FORMAT, FORMAT_VERSION, INDEX_FILE, SPLITS

DEFAULT_SHARD_SIZE = 256_000_000
DEFAULT_QUALITY = 90
# Below this many files a pack decodes in this process: starting worker processes costs
# more than it saves.
WORKERS_FROM = 512
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
_TAR_BLOCK = 512


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


def refuse_multilabel(listing, src) -> None:
    """Shards store one class index per image: a multi-label list is refused in one line."""
    if listing.multilabel:
        raise ValueError(
            f"{src}: shards (datasets pack, --stream) hold one class per image, not yet a "
            "multi-label list; train from the list itself, without --stream"
        )


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
    if listing is not None:
        refuse_multilabel(listing, src)
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
