"""Checkpoints that describe themselves, written atomically.

A checkpoint holds the weights and everything needed to use them without guessing: how to
rebuild the model, the class names, the preprocessing, the resolved config, the versions and
the date. ``last.pt`` also holds the training state (optimizer, schedule, RNG, position in
the epoch) so a run resumes exactly where it stopped.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "cnnkit.checkpoint/1"


def versions() -> dict[str, str]:
    import torchvision

    from cnnkit import __version__

    return {
        "cnnkit": __version__,
        "torch": str(torch.__version__),  # a TorchVersion object otherwise
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    payload = {
        "format": FORMAT,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **payload,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a cnnkit checkpoint (tensors and plain data only: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e}). "
            "It may be truncated or not a cnnkit file."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cnnkit checkpoint (format {FORMAT} expected)")
    return ckpt
