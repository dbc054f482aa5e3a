"""``cnnkit cache``: what cnnkit keeps in the user cache, and clearing it.

The folders are the ones builtin.py and folder.py write (under ``$XDG_CACHE_HOME/cnnkit``,
``~/.cache/cnnkit`` without it); this module only measures and removes them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .builtin import cache_dir, user_cache_dir
from .folder import decoded_cache_dir


@dataclass
class CacheFolder:
    name: str  # what `cnnkit cache clear NAME` calls it
    what: str
    path: Path
    size_bytes: int
    entries: int  # decoded image sets, or downloaded data sets

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "what": self.what,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "entries": self.entries,
        }


def _size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:  # removed while we walk (a run finishing its cache file)
            continue
    return total


def _count(folder: Path, pattern: str, directories: bool = False) -> int:
    """Entries matching ``pattern``, hidden ones (in-progress temporary files) left out."""
    return sum(
        1
        for p in folder.glob(pattern)
        if not p.name.startswith(".") and (p.is_dir() if directories else p.is_file())
    )


def cache_folders() -> list[CacheFolder]:
    """Every cache folder cnnkit writes, with its size and entries (0 where it is absent)."""
    # decoded: one <key>.npy (+ <key>.json) per set of files and decode size, which is why
    # it grows with every new image size; datasets: one folder per downloaded data set.
    layout = [
        ("decoded", "decoded images of folder data sets", decoded_cache_dir(), "*.npy", False),
        ("datasets", "downloaded built-in data sets", cache_dir(), "*", True),
        ("shards", "folders packed to shards for --stream", user_cache_dir() / "shards", "*", True),
    ]
    folders = []
    for name, what, path, pattern, directories in layout:
        exists = path.is_dir()
        folders.append(
            CacheFolder(
                name,
                what,
                path,
                _size(path) if exists else 0,
                _count(path, pattern, directories) if exists else 0,
            )
        )
    return folders


CACHE_NAMES = ("decoded", "datasets", "shards")


def check_names(names: list[str]) -> None:
    unknown = sorted(set(names) - set(CACHE_NAMES))
    if unknown:
        raise ValueError(
            f"unknown cache folder {', '.join(unknown)}; choose from: {', '.join(CACHE_NAMES)}"
        )


def clear_cache(names: list[str] | None = None) -> list[CacheFolder]:
    """Remove the named cache folders (default: all); returns what was removed."""
    check_names(names or [])
    removed = []
    for folder in cache_folders():
        if (not names or folder.name in names) and folder.path.is_dir():
            shutil.rmtree(folder.path)
            removed.append(folder)
    return removed


def cache_root() -> Path:
    return user_cache_dir()
