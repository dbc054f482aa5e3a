"""Your own images: class folders, train/val/test trees and CSV lists, decoded once.

Layouts ``--data PATH`` accepts:

- a folder of class folders (``photos/cats/*.jpg``, ``photos/dogs/*.jpg``): cnnkit makes a
  stratified, seeded train / validation / test split;
- a folder with ``train/`` and ``val/`` (or ``validation/``), optionally ``test/``, each a
  folder of class folders;
- a CSV or TSV file of ``path,label`` rows (an optional header; an optional third column
  ``split`` with train/val/test), paths relative to the file;
- a multi-label list: the same with the header ``path,labels``, each cell holding the
  image's labels separated by ``;`` (``cat;dog``), an empty cell for none
  (data/multilabel.py); its split is iterative stratification over the label sets. With
  ``split`` given, a label on a val or test row but on no training row is refused;
- a folder holding such a list as ``labels.csv`` (or ``labels.tsv``), or whose ``train/``,
  ``val/`` and ``test/`` folders each hold one (paths relative to each file; the split is
  the folder's).

Decoding JPEGs is the main cost on a CPU, so each image is decoded once, at the size
training uses, into a uint8 array cached on disk (keyed by the files' content and the size)
and loaded into memory when it fits, memory-mapped when it does not. Later epochs and later
runs skip the decoding. A file that cannot be decoded is reported with the reason and left
out; the count is part of the data set's summary.

Only regular files are read: a dangling or looping symbolic link, a FIFO, a socket or a
device (which would block the reader) is skipped with a note that names it and why, and a
linked folder inside a class folder is not followed. A folder or list without a single
image file is refused with what to put where. A CSV list must be UTF-8 and every row needs
a path and a label; rows may point outside the list's folder (``../``, absolute paths),
which ``cnnkit datasets check`` lists.

Class names are text: a class folder's name is decoded as the file system does
(``os.fsdecode``), and bytes that are not UTF-8 (a folder named in Latin-1, the bytes
``b'caf\\xe9'``) are shown as visible escapes (the class ``caf\\xe9``, by
``display_name``), so the name can be logged, plotted and served; the files are still
read through their real paths, and a run's split file keeps those. File names in notes and
the doctor's findings are shown the same way.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnkit.progress import progress

from .builtin import data_roots, user_cache_dir
from .corrections import apply_to_files
from .decode import GRAYSCALE_MODES, ImageReadError, image_header, open_image, resize_and_crop
from .memory import DataSplits, ImageTensors, channel_stats, stratified_split, stratified_subset
from .multilabel import SEPARATOR, iterative_split, parse_labels, targets_of

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
CACHE_VERSION = 1
FOLDER_IMAGE_SIZE = 128  # models trained from scratch on photos, unless --image-size
# Inferred input sizes never go below this: the tutorial seed-cnn (two valid 3x3 convs, each
# with a 2x2 pool) needs at least 10x10, and 16 is the next multiple of 8, which keeps 8x8
# digits at a 2x upscale instead of the 16x of the photo default.
SMALLEST_INFERRED_SIZE = 16
HEADER_SAMPLE = 1000  # file headers read to infer channels and size (evenly spread)


@dataclass
class FileList:
    """The labelled files of a folder or CSV data set, by split ('all' if not yet split)."""

    root: Path
    classes: list[str]
    # (file, class index); in a multi-label list (file, tuple of label indices)
    splits: dict[str, list[tuple[Path, int | tuple[int, ...]]]]
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (file, why not used)
    # entries that are no readable file: dangling or looping links, FIFOs, sockets, devices
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (entry, why)
    list_file: Path | None = None  # the CSV/TSV list, when the data set is one

    @property
    def file_count(self) -> int:
        return sum(len(files) for files in self.splits.values())

    @property
    def multilabel(self) -> bool:
        """A multi-label list: label tuples in place of class indices."""
        return any(map(_is_multilabel, self.splits.values()))


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def display_name(name: str) -> str:
    """``name`` as valid text: bytes of a file name that are not UTF-8 (``os.fsdecode``
    keeps them as lone surrogates) shown as ``\\xe9``-style escapes; see the module
    docstring."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def not_a_file(path: Path) -> str:
    """Why ``path`` is no regular file to read ('' when it is one, or when nothing is
    there: a missing file is reported when it fails to decode, as before).

    Reading a FIFO or a device would block or never end, so only regular files are read.
    """
    try:
        mode = path.stat().st_mode  # follows symbolic links
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return f"dangling symbolic link (to {display_name(os.readlink(path))})"
        return "" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})"
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    kind = next((what for test, what in _SPECIAL_FILES if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def _class_folders(root: Path, ignored: list, skipped: list) -> dict[str, list[Path]]:
    """{class name: image files} for one folder of class folders."""
    out: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if _is_hidden(entry):
            continue
        if entry.is_file():
            ignored.append((entry, "not inside a class folder"))
            continue
        if not entry.is_dir():
            skipped.append((entry, not_a_file(entry) or "no such folder"))
            continue
        out[display_name(entry.name)] = find_image_files(entry, ignored, skipped)
    return out


def find_image_files(
    folder: Path, ignored: list | None = None, skipped: list | None = None
) -> list[Path]:
    """The image files under ``folder``, recursively and sorted; hidden files and folders
    left out. Files of other extensions are added to ``ignored``, links to folders (not
    followed) and anything not a regular file (never opened: a FIFO would block) to
    ``skipped``, each as (path, why)."""
    ignored = [] if ignored is None else ignored
    skipped = [] if skipped is None else skipped
    files = []
    for f in sorted(folder.rglob("*")):
        if any(p.startswith(".") for p in f.relative_to(folder).parts):
            continue
        if f.is_dir():
            if f.is_symlink():  # rglob does not descend into linked folders
                skipped.append((f, "symbolic link to a folder, not followed"))
            continue
        why = not_a_file(f)
        if why:
            skipped.append((f, why))
        elif f.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(f)
        else:
            ignored.append((f, f"not an image file extension ({f.suffix or 'none'})"))
    return files


def _read_text(path: Path) -> str:
    """The list's text; a list that is not UTF-8 is refused with what to do about it."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise ValueError(
            f"{path}: the list is saved as UTF-16 (or holds NUL bytes); save it as UTF-8 "
            "(in Excel: 'CSV UTF-8') and try again"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the list "
            "as UTF-8 (in Excel: 'CSV UTF-8') and try again"
        ) from None


def _lines_have(lines: list[int], what: str) -> str:
    """'line 3 has WHAT' or 'lines 3, 6 have WHAT' (the first ten numbers)."""
    if len(lines) == 1:
        return f"line {lines[0]} has {what}"
    shown = ", ".join(map(str, lines[:10]))
    more = f" and {len(lines) - 10} more" if len(lines) > 10 else ""
    return f"lines {shown}{more} have {what}"


def _csv_rows(path: Path, split: str | None = None, task: str = "auto") -> tuple[list[tuple], bool]:
    """The (line, path, label cell, split) rows of a CSV/TSV list, and whether it is a
    multi-label list (header ``path,labels``, or ``task`` multilabel). ``split``: every
    row's split (a labels file inside a train/, val/ or test/ folder)."""
    text = _read_text(path)
    dialect = (
        "excel-tab" if path.suffix.lower() == ".tsv" or "\t" in text.split("\n")[0] else "excel"
    )
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    rows, line_of = [], []  # the rows that are not blank, and the line each ends on
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append(r)
                line_of.append(reader.line_num)
    except csv.Error as e:
        raise ValueError(f"{path}, line {reader.line_num}: not a valid CSV/TSV row ({e})") from None
    if not rows:
        raise ValueError(f"{path}: empty list; expected rows of path,label")
    header = [c.strip().lower() for c in rows[0]]
    has_header = header[:2] in (
        ["path", "label"],
        ["file", "label"],
        ["filename", "label"],
        ["image", "label"],
    )
    multilabel = header[:2] in (["path", "labels"], ["file", "labels"], ["image", "labels"])
    has_header = has_header or multilabel
    if multilabel and task == "single":
        raise ValueError(
            f"{path}: --task single, but the header path,labels makes it a multi-label list; "
            "drop --task, or name the column label"
        )
    multilabel = multilabel or task == "multilabel"
    body = rows[1:] if has_header else rows
    split_col = header.index("split") if has_header and "split" in header else None
    entries: list[tuple[int, Path, str, str]] = []
    no_label, no_path, several = [], [], []
    for n, r in zip(line_of[1:] if has_header else line_of, body, strict=True):
        if len(r) < 2:
            raise ValueError(f"{path}, line {n}: expected path,label, got {r!r}")
        if not r[0].strip():
            no_path.append(n)
        if not r[1].strip() and not multilabel:  # in a multi-label list: no label
            no_label.append(n)
        if SEPARATOR in r[1] and not multilabel:
            several.append(n)
        row_split = split or "all"
        if split_col is not None:
            row_split = SPLIT_NAMES.get(r[split_col].strip().lower(), "")
            if not row_split:
                raise ValueError(
                    f"{path}, line {n}: split must be train, val or test, got '{r[split_col]}'"
                )
        entries.append((n, path.parent / r[0].strip(), r[1].strip(), row_split))
    # An empty label would make a class named '', an empty path would name the folder.
    if no_label or no_path:
        problems = [_lines_have(no_label, "an empty label")] if no_label else []
        problems += [_lines_have(no_path, "an empty path")] if no_path else []
        raise ValueError(
            f"{path}: {'; '.join(problems)}; give every row a path and its class, or delete "
            "those rows"
        )
    if several:
        problem = _lines_have(several, f"a '{SEPARATOR}' in the label")
        raise ValueError(
            f"{path}: {problem}; for several "
            "labels per image, name the columns path,labels (a multi-label list)"
        )
    return entries, multilabel


def _refuse_labels_unseen_in_training(rows: list[tuple], sets: list[list[str]]) -> None:
    """A label on a val or test row but on no training row could never be learned.
    ``rows``: (line, path, label cell, split, list file); ``sets``: their labels."""
    known = {x for r, labels in zip(rows, sets, strict=True) if r[3] == "train" for x in labels}
    for (line, _, _, split, list_file), labels in zip(rows, sets, strict=True):
        for label in labels:
            if split in ("val", "test") and label not in known:
                raise ValueError(
                    f"{list_file}, line {line}: label '{label}' is on a {split} image but on "
                    "no training image; add training images with it, or fix the row"
                )


def _file_list(root: Path, rows: list[tuple], multilabel: bool, list_file: Path) -> FileList:
    """The FileList of (line, path, label cell, split, list file) rows."""
    # Only regular files are read: a FIFO would block the decoder (and the content hash).
    skipped = [(r[1], why) for r in rows if (why := not_a_file(r[1]))]
    if skipped:
        dropped = {p for p, _ in skipped}
        rows = [r for r in rows if r[1] not in dropped]
    splits: dict[str, list] = {}
    if multilabel:
        sets = [parse_labels(r[2]) for r in rows]
        if {r[3] for r in rows} != {"all"}:
            _refuse_labels_unseen_in_training(rows, sets)
        classes = sorted({name for labels in sets for name in labels})
        index = {c: i for i, c in enumerate(classes)}
        for r, labels in zip(rows, sets, strict=True):
            splits.setdefault(r[3], []).append((r[1], tuple(sorted(index[x] for x in labels))))
        return FileList(root, classes, splits, skipped=skipped, list_file=list_file)
    classes = sorted({r[2] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    for r in rows:
        splits.setdefault(r[3], []).append((r[1], index[r[2]]))
    return FileList(root, classes, splits, skipped=skipped, list_file=list_file)


def _read_csv(path: Path, task: str = "auto") -> FileList:
    rows, multilabel = _csv_rows(path, task=task)
    return _file_list(path.parent, [(*r, path) for r in rows], multilabel, path)


LABELS_FILES = ("labels.csv", "labels.tsv")


def _labels_file(folder: Path) -> Path | None:
    return next((folder / n for n in LABELS_FILES if (folder / n).is_file()), None)


def _read_labels_files(root: Path, files: dict[str, Path], task: str = "auto") -> FileList:
    """A folder whose train/, val/ and test/ each hold a labels file: one list."""
    rows, kinds = [], set()
    for split, labels_file in files.items():
        split_rows, multilabel = _csv_rows(labels_file, split, task)
        rows += [(*r, labels_file) for r in split_rows]
        kinds.add(multilabel)
    if len(kinds) > 1:
        raise ValueError(
            f"{root}: some labels files have the header path,labels and some do not; give "
            "them all the same columns"
        )
    return _file_list(root, rows, kinds.pop(), next(iter(files.values())))


def find_data_path(path: str | Path) -> Path:
    """A folder or list file as given, or else, for a relative path, the first
    ``<dir>/<path>`` that exists for the directories in ``$CNNKIT_DATA``."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    return next((root / path for root in data_roots() if (root / path).exists()), path)


def list_images(path: str | Path, task: str = "auto") -> FileList:
    """Find the labelled images of a folder or CSV/TSV list (no decoding yet); a relative
    path is looked up in the working directory, then in each ``$CNNKIT_DATA`` directory.
    ``task``: auto, single or multilabel (a list's label cells read as label sets)."""
    given, path = path, find_data_path(path)
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise ValueError(f"{path}: a data file must be a CSV or TSV list of path,label rows")
        return _read_csv(path, task)
    if not path.is_dir():
        roots = ", ".join(map(str, data_roots()))
        where = f" or in $CNNKIT_DATA ({roots})" if roots else ""
        raise FileNotFoundError(
            f"data set not found: '{given}' is not a built-in data set, nor a folder or "
            f"list file in the working directory{where}; give its path, or add the "
            "directory that holds it to $CNNKIT_DATA"
        )
    if labels_file := _labels_file(path):
        return _read_csv(labels_file, task)
    subdirs = {d.name.lower(): d for d in path.iterdir() if d.is_dir() and not _is_hidden(d)}
    split_labels = {
        SPLIT_NAMES[name]: f
        for name, d in subdirs.items()
        if name in SPLIT_NAMES and (f := _labels_file(d))
    }
    if "train" in split_labels:
        return _read_labels_files(path, split_labels, task)
    if task == "multilabel":
        raise ValueError(
            f"{path}: --task multilabel, but a folder of class folders gives one class per "
            "image; put a path,labels list in it as labels.csv"
        )
    ignored: list[tuple[Path, str]] = []
    skipped: list[tuple[Path, str]] = []
    if "train" in subdirs:
        split_dirs = {SPLIT_NAMES[name]: d for name, d in subdirs.items() if name in SPLIT_NAMES}
        per_split = {s: _class_folders(d, ignored, skipped) for s, d in split_dirs.items()}
    else:
        per_split = {"all": _class_folders(path, ignored, skipped)}
    classes = sorted({c for folders in per_split.values() for c in folders})
    if len(classes) < 2:
        raise ValueError(
            f"{path}: found {len(classes)} class folder(s) {classes}; a classifier needs at "
            "least two (one folder of images per class)"
        )
    index = {c: i for i, c in enumerate(classes)}
    splits = {
        s: [(f, index[c]) for c in sorted(folders) for f in folders[c]]
        for s, folders in per_split.items()
    }
    return FileList(path, classes, splits, ignored, skipped)


def no_images_problem(listing: FileList) -> str:
    """What to say when a listing has no image files at all ('' when it has some)."""
    if listing.file_count:
        return ""
    if listing.list_file is not None:
        what = f"no images found in {display_name(str(listing.list_file))}: "
        if listing.skipped:
            what += f"all {len(listing.skipped)} row(s) name no readable file"
        else:
            what += "the list has no rows of path,label"
        return what + "; add rows of path,label (paths relative to the list's folder)"
    root = display_name(str(listing.root))
    what = f"no images found in {root} ({len(listing.classes)} class folders, all empty"
    if listing.ignored or listing.skipped:
        what += f"; {len(listing.ignored) + len(listing.skipped)} other file(s) left out"
    return (
        what + f"); put each class's images in its folder (e.g. {root}/"
        f"{listing.classes[0]}/001.jpg), as .jpg, .png, .webp, .bmp, .gif or .tiff files"
    )


def _skipped_notes(skipped: list[tuple[Path, str]], limit: int = 10) -> list[str]:
    if not skipped:
        return []
    lines = [f"skipped {len(skipped)} entr(ies) that are not readable files:"]
    lines += [f"  {display_name(str(p))}: {why}" for p, why in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more ('cnnkit datasets check' lists all)")
    return lines


# ---------------------------------------------------------------- the model input


@dataclass
class InputChoice:
    """The channels and input side a folder is decoded at, and why (for the run header)."""

    channels: int
    size: int
    note: str  # '' when nothing was inferred that differs from the photo default


def choose_input(
    paths: list[Path], image_size: int | None = None, channels: int | None = None
) -> InputChoice:
    """Infer what is not given from the images' headers (no decoding): 1 channel when they
    are all grayscale, and for small images their median shorter side rounded to a multiple
    of 8 (at least ``SMALLEST_INFERRED_SIZE``, at most ``FOLDER_IMAGE_SIZE``), so that small
    images are not upscaled many-fold. Up to ``HEADER_SAMPLE`` headers are read, evenly
    spread over the files, so a large data set costs no more than a small one.
    """
    if image_size is not None and channels is not None:
        return InputChoice(channels, image_size, "")
    # Evenly spread over all the files: they are grouped by split and class.
    sample = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), HEADER_SAMPLE)).round())
    probed = [paths[int(i)] for i in sample] if paths else []
    headers = [h for p in probed if not not_a_file(p) and (h := image_header(p))]
    if not headers:  # nothing readable: the decoder reports why; keep the photo defaults
        return InputChoice(channels or 3, image_size or FOLDER_IMAGE_SIZE, "")
    what = []  # what was inferred, for the note
    if channels is None:
        grayscale = all(mode in GRAYSCALE_MODES for mode, _, _ in headers)
        channels = 1 if grayscale else 3
        what += ["grayscale"] if grayscale else []
    if image_size is None:
        shorter = int(np.median([min(w, h) for _, w, h in headers]))
        image_size = FOLDER_IMAGE_SIZE
        if shorter < FOLDER_IMAGE_SIZE:
            nearest = int(shorter / 8 + 0.5) * 8  # round half up: 28x28 digits give 32
            image_size = min(FOLDER_IMAGE_SIZE, max(SMALLEST_INFERRED_SIZE, nearest))
            width = int(np.median([w for _, w, _ in headers]))
            height = int(np.median([h for _, _, h in headers]))
            what.append(f"{width}x{height} (median)")
    if not what:
        return InputChoice(channels, image_size, "")
    return InputChoice(
        channels,
        image_size,
        f"images are {' and '.join(what)}: input {channels}x{image_size}x{image_size} "
        "(--image-size to change)",
    )


# ---------------------------------------------------------------- decoding


def decode_one(path: Path, channels: int, size: int) -> np.ndarray:
    """One file -> uint8 (C, size, size); raises ImageReadError with the reason."""
    why = not_a_file(path)  # a FIFO named in a run's split.json must not block decoding
    if why:
        raise ImageReadError(f"{display_name(str(path))}: {why}")
    im = resize_and_crop(open_image(path, draft=size), channels, size)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_or_error(path: Path, channels: int, size: int) -> tuple[np.ndarray | None, str]:
    try:
        return decode_one(path, channels, size), ""
    except ImageReadError as e:
        return None, display_name(str(e))
    except Exception as e:  # a decoder bug must not end the whole data set
        return None, display_name(f"{path}: cannot decode image ({type(e).__name__}: {e})")


class _Map(torch.utils.data.Dataset):
    def __init__(self, fn, items):
        self.fn, self.items = fn, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.fn(*self.items[i])


def map_in_workers(
    fn,
    items: list[tuple],
    workers: int | None = None,
    chunk: int = 16,
    label: str | None = None,
    summary: bool = True,
):
    """``fn(*item)`` for every item, in order, computed in forked worker processes
    (a DataLoader does the scheduling); ``workers=0`` runs in this process. ``label``: show
    progress under that name (``summary``: and a closing line with the time)."""
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        _Map(fn, items),
        batch_size=chunk,
        num_workers=workers,
        collate_fn=lambda b: b,
        multiprocessing_context="fork" if workers else None,
    )
    with progress(label or "", len(items), "files", quiet=label is None, summary=summary) as step:
        for batch in loader:
            step(len(batch))
            yield from batch


def content_key(paths: list[Path], channels: int, size: int) -> str:
    """A key for the decoded array: every file's bytes, their order, channels and size."""
    h = hashlib.sha256(f"cnnkit-decoded/{CACHE_VERSION}/{channels}/{size}".encode())
    for p in paths:
        try:
            if not_a_file(p):  # never read a FIFO or device: it can block forever
                raise OSError(f"{p}: not a regular file")
            h.update(hashlib.sha1(p.read_bytes()).digest())
        except OSError:
            h.update(b"unreadable:" + os.fsencode(p))
    return h.hexdigest()[:32]


def decoded_cache_dir() -> Path:
    return user_cache_dir() / "decoded"


@dataclass
class DecodedImages:
    images: np.ndarray  # uint8 (N, C, S, S) of the files that decoded
    kept: list[int]  # their positions in the input list
    errors: list[str]  # one line per file that did not decode
    seconds: float  # decoding time (0 when loaded from the cache)
    from_cache: bool


def decode_images(
    paths: list[Path],
    channels: int,
    size: int,
    workers: int | None = None,
    memory_budget: int | None = None,
) -> DecodedImages:
    """Decode every file once into a cached uint8 array (worker processes do the decoding)."""
    key = content_key(paths, channels, size)
    cache = decoded_cache_dir()
    array_path, meta_path = cache / f"{key}.npy", cache / f"{key}.json"
    budget = memory_budget if memory_budget is not None else _memory_budget()
    cached = _from_cache(array_path, meta_path, budget)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    _check_room(cache, len(paths), channels, size)
    with exclusive(cache / f".{key}.lock"):
        # another process may have built it while this one waited for the lock
        cached = _from_cache(array_path, meta_path, budget)
        if cached is not None:
            return cached
        return _decode_into_cache(paths, channels, size, workers, array_path, meta_path, budget)


def _from_cache(array_path: Path, meta_path: Path, budget: int) -> DecodedImages | None:
    if not (array_path.exists() and meta_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    return DecodedImages(_load(array_path, budget), meta["kept"], meta["errors"], 0.0, True)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """One process at a time in the block (an advisory lock on ``path``: POSIX only). One
    process decodes a set of files while the others wait, then map the same cache file:
    the workers of a distributed run on one machine decode it once, not once each, and so
    do two runs started together."""
    try:
        import fcntl
    except ImportError:  # Windows: each process decodes; the cache file is replaced whole
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with progress(
                "waiting for another process (decoding or packing these files)", None, summary=False
            ):
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (NFS, Lustre noflock): decode unlocked
            pass
        yield  # closing the file releases the lock


def _decode_into_cache(
    paths: list[Path],
    channels: int,
    size: int,
    workers: int | None,
    array_path: Path,
    meta_path: Path,
    budget: int,
) -> DecodedImages:
    cache, key = array_path.parent, array_path.stem
    n = len(paths)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{key}.", suffix=".npy")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(n, channels, size, size)
        )
        ok = np.zeros(n, dtype=bool)
        errors: list[str] = []
        jobs = [(p, channels, size) for p in paths]
        # the run header reports the decoding time: the bar only, no closing line
        decoded = map_in_workers(_decode_or_error, jobs, workers, label="decoding", summary=False)
        for i, (a, err) in enumerate(decoded):
            if a is None:
                errors.append(err)
            else:
                out[i] = a
                ok[i] = True
        seconds = time.perf_counter() - t0
        kept = np.flatnonzero(ok).tolist()
        if len(kept) < n:  # compact: keep only the images that decoded
            compact = np.lib.format.open_memmap(
                tmp + ".c", mode="w+", dtype=np.uint8, shape=(len(kept), channels, size, size)
            )
            for start in range(0, len(kept), 1024):
                compact[start : start + 1024] = out[kept[start : start + 1024]]
            compact.flush()
            del out, compact
            os.replace(tmp + ".c", tmp)
        else:
            out.flush()
            del out
        os.replace(tmp, array_path)
        meta_path.write_text(
            json.dumps({"kept": kept, "errors": errors, "size": size, "channels": channels})
        )
    finally:
        for leftover in (tmp, tmp + ".c"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return DecodedImages(_load(array_path, budget), kept, errors, seconds, False)


class DecodedWontFit(ValueError):
    """The decoded images of a folder would not fit on the cache's disk (data.resolve then
    streams the folder from shards instead)."""


def _check_room(cache: Path, count: int, channels: int, size: int) -> None:
    need = count * channels * size * size
    free = shutil.disk_usage(cache).free
    if need > free * 0.9:  # room left for everything else on the disk
        raise DecodedWontFit(
            f"decoding {count:,} images at {size}x{size} takes {need / 2**30:.1f} GiB but "
            f"{cache} has {free / 2**30:.1f} GiB free"
        )


def _memory_budget() -> int:
    """Bytes of decoded images one process holds in memory: a third of the machine's RAM
    shared by the training processes on it (torchrun's LOCAL_WORLD_SIZE), or
    $CNNKIT_MEMORY_BUDGET (bytes). Above it the cache stays memory-mapped, and the
    processes share the one copy in the page cache."""
    if os.environ.get("CNNKIT_MEMORY_BUDGET"):
        return int(float(os.environ["CNNKIT_MEMORY_BUDGET"]))
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 3 // processes
    except (ValueError, OSError, AttributeError):
        return (4 << 30) // processes


def _load(path: Path, budget: int) -> np.ndarray:
    # Copy-on-write memory map: no copy until written, which nothing does.
    a = np.load(path, mmap_mode="c")
    return np.ascontiguousarray(a) if a.nbytes <= budget else a


# ---------------------------------------------------------------- splitting and loading


def _is_multilabel(files: list) -> bool:
    return bool(files) and isinstance(files[0][1], tuple)


def _label_targets(files: list, classes: int) -> np.ndarray:
    """(N, K) 0/1 matrix of a multi-label split's (file, label tuple) entries."""
    return targets_of([labels for _, labels in files], classes)


def _split_indices(labels, val_split: float, test_split: float, seed: int, classes: int = 0):
    """Stratified train / val / test indices of one pool of files (label tuples: by
    iterative stratification)."""
    if isinstance(labels, list):  # multi-label: the label tuples
        train_share = 1 - val_split - test_split
        parts = iterative_split(
            targets_of(labels, classes),
            [train_share, val_split, test_split],
            seed,
        )
        return tuple(torch.from_numpy(p) for p in parts)
    rest, test = stratified_split(labels, test_split, seed)
    val_share = val_split / (1 - test_split) if test_split < 1 else 0.0
    train_in_rest, val_in_rest = stratified_split(labels[rest], val_share, seed + 1)
    return rest[train_in_rest], rest[val_in_rest], test


def plan_splits(
    listing: FileList, val_split: float, test_split: float, seed: int, notes: list[str]
) -> dict[str, list[tuple[Path, int]]]:
    """The files of each split: made from one pool, or as the folder/CSV defines them."""
    splits = dict(listing.splits)
    if "all" not in splits and not splits.get("train"):  # before splitting an empty train/
        where = "rows with split 'train'" if listing.list_file else "images in train/<class>/"
        raise ValueError(
            f"{display_name(str(listing.list_file or listing.root))}: no training images "
            f"found, only {', '.join(s for s in splits if splits[s]) or 'empty splits'}; "
            f"add {where}"
        )
    if "all" in splits:
        if len(splits) > 1:
            raise ValueError(f"{listing.root}: some rows name a split and some do not")
        pool = splits.pop("all")
        multilabel = _is_multilabel(pool)
        labels = [lb for _, lb in pool] if multilabel else torch.tensor([lb for _, lb in pool])
        parts = _split_indices(labels, val_split, test_split, seed, len(listing.classes))
        for name, idx in zip(("train", "val", "test"), parts, strict=True):
            if len(idx):
                splits[name] = [pool[i] for i in idx.tolist()]
        how = "iterative stratification over label sets" if multilabel else "stratified"
        notes.append(
            f"split made here: {how}, seed {seed}, val {val_split:.0%}, test {test_split:.0%}"
        )
    elif "val" not in splits and "train" in splits and val_split > 0:
        train = splits["train"]
        if _is_multilabel(train):
            targets = _label_targets(train, len(listing.classes))
            keep, take = iterative_split(targets, [1 - val_split, val_split], seed)
        else:
            keep, take = stratified_split(torch.tensor([lb for _, lb in train]), val_split, seed)
        splits["train"] = [train[i] for i in keep.tolist()]
        splits["val"] = [train[i] for i in take.tolist()]
        how = "iterative stratification" if _is_multilabel(train) else "stratified"
        notes.append(f"no val/ split: {val_split:.0%} of train/ held out ({how})")
    if not splits.get("train"):
        raise ValueError(f"{display_name(str(listing.root))}: no training images found")
    return splits


def _json_label(label):
    return list(label) if isinstance(label, tuple) else label


def load_folder(
    path: str | Path,
    *,
    image_size: int | None = None,
    crop_pct: float = 1.0,
    val_split: float = 0.1,
    test_split: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    split_file: str | Path | None = None,
    channels: int | None = None,
    corrections=None,
    task: str = "auto",
):
    """Load a folder or CSV data set into memory (see the module docstring).

    ``image_size`` and ``channels``: the model input; each one not given is inferred from
    the images (``choose_input``: grayscale images give 1 channel, small ones a smaller
    size), with a note saying what was chosen. ``split_file``: a run's split.json, to get
    exactly the files that run used (with their labels). ``corrections``: labels changed
    and files left out before the split (data/corrections.py). ``task``: see list_images.
    """
    notes: list[str] = []
    if split_file is not None:
        saved = json.loads(Path(split_file).read_text())
        root, classes = Path(saved["root"]), saved["classes"]
        splits = {  # a multi-label run's label lists back to tuples
            s: [(root / rel, tuple(lb) if isinstance(lb, list) else lb) for rel, lb in saved[s]]
            for s in ("train", "val", "test")
            if saved.get(s)
        }
    else:
        listing = list_images(path, task)
        empty = no_images_problem(listing)
        if empty:
            raise ValueError(empty)
        root, classes = listing.root, listing.classes
        if corrections is not None and listing.multilabel:
            raise ValueError(
                "--relabel / --exclude take one class per image; for a multi-label list, "
                "edit its labels cells"
            )
        if corrections is not None:  # --relabel / --exclude, before the split
            fixed = apply_to_files(corrections, listing.splits, root, classes)
            listing = dataclasses.replace(listing, splits=fixed)
            notes.append(corrections.describe())
        splits = plan_splits(listing, val_split, test_split, seed, notes)
        if listing.ignored:
            examples = ", ".join(
                f"{display_name(p.name)} ({why})" for p, why in listing.ignored[:3]
            )
            notes.append(f"ignored {len(listing.ignored)} file(s) that are not images: {examples}")
        notes += _skipped_notes(listing.skipped)

    order = [s for s in ("train", "val", "test") if s in splits]
    all_files = [f for s in order for f in splits[s]]
    choice = choose_input([p for p, _ in all_files], image_size, channels)
    image_size, channels = choice.size, choice.channels
    if choice.note:
        notes.insert(0, choice.note)
    stored = round(image_size / crop_pct)
    decoded = decode_images([p for p, _ in all_files], channels, stored)
    n = len(all_files)
    if decoded.from_cache:
        notes.append(f"{n - len(decoded.errors):,} decoded images loaded from the cache")
    else:
        notes.append(
            f"decoded {n:,} files at {stored}x{stored} in {decoded.seconds:.1f}s "
            f"({n / max(decoded.seconds, 1e-9):,.0f} images/s); cached for later runs"
        )
    if decoded.errors:
        notes.append(f"skipped {len(decoded.errors)} file(s) that could not be decoded:")
        notes += [f"  {e}" for e in decoded.errors]

    train_count = len(splits["train"])
    if not any(i < train_count for i in decoded.kept):  # the train split comes first
        raise ValueError(
            f"{display_name(str(path))}: none of the {train_count:,} training image files "
            f"could be decoded (the first: {decoded.errors[0]}); run 'cnnkit datasets check "
            f"{display_name(str(path))}' for each file's reason"
        )

    # The cache holds the decoded files in split order, so each split is a contiguous slice:
    # a view, which keeps a memory-mapped cache on disk (batches then read only their rows).
    images = torch.from_numpy(decoded.images)
    kept = set(decoded.kept)
    multilabel = _is_multilabel(all_files)
    parts, files = {}, {}
    start = row = 0
    for s in order:
        kept_files = [all_files[i] for i in range(start, start + len(splits[s])) if i in kept]
        start += len(splits[s])
        labels = (
            torch.from_numpy(_label_targets(kept_files, len(classes)))
            if multilabel
            else torch.tensor([lb for _, lb in kept_files], dtype=torch.long)
        )
        parts[s] = ImageTensors(images[row : row + len(kept_files)], labels)
        row += len(kept_files)
        files[s] = [
            [str(p.relative_to(root)) if p.is_relative_to(root) else str(p), _json_label(lb)]
            for p, lb in kept_files
        ]
    if isinstance(decoded.images, np.memmap):
        notes.append(
            f"{decoded.images.nbytes / 2**30:.1f} GiB of decoded images: more than the "
            "memory budget, read from the memory-mapped cache batch by batch"
        )
    if limit is not None and limit < len(parts["train"]):
        if multilabel:  # a subset keeping every label's share
            n = len(parts["train"])
            targets = parts["train"].labels.numpy()
            keep = torch.from_numpy(iterative_split(targets, [limit / n, 1 - limit / n], seed)[0])
        else:
            keep = stratified_subset(parts["train"].labels, limit, seed)
        parts["train"] = parts["train"].subset(keep)
        files["train"] = [files["train"][i] for i in keep.tolist()]
        notes.append(f"training on a stratified subset of {len(keep):,} images (limit={limit})")
    mean, std = channel_stats(parts["train"].images)
    return DataSplits(
        name=display_name(Path(path).name if path else root.name),
        classes=list(classes),
        train=parts["train"],
        val=parts.get("val"),
        test=parts.get("test"),
        mean=mean,
        std=std,
        notes=notes,
        input_size=(image_size, image_size),
        files=files,
        root=str(root),
    )
