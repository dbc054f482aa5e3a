"""Checkpoints that describe themselves, written atomically.

This module is the checkpoint format's one owner: what is written (``describe_run``,
``checkpoint_payload``, ``save_checkpoint``) and how it is read back (``load_checkpoint``,
``read_checkpoint``, ``model_from_checkpoint``).

A checkpoint holds the weights and everything needed to use them without guessing: how to
rebuild the model, the class names, the preprocessing, the resolved config, the versions and
the date. ``last.pt`` also holds the training state (optimizer, schedule, RNG, position in
the epoch) so a run resumes exactly where it stopped.

The schema, version 1 (``format: "cnnkit.checkpoint/1"``)::

    format, versions {cnnkit, torch, torchvision, python}, created (ISO 8601, UTC)
    model {name, arch, head, num_classes, in_chans, input_size [H, W]}
    classes [names], preprocessing {channels, size [H, W], mean, std, resize, crop_pct,
    interpolation}, config (the resolved Config as a dict), data {name, root, train, val,
    test}, state_dict, epoch (epochs trained, across stages), metrics (the last epoch's row)
    train_state {optimizer, schedule, state} (last.pt only)

A file whose version is newer than this code reads is refused with a clear error; an
older version would be converted here when the schema changes.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnkit.models import create_model
from cnnkit.version import __version__

if TYPE_CHECKING:
    from cnnkit.config import Config
    from cnnkit.data import DataSplits
    from cnnkit.models.weights import Preprocessing

FORMAT_NAME = "cnnkit.checkpoint"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
READABLE_VERSIONS = (1,)  # a version the schema moved on from gets a converter here


def versions() -> dict[str, str]:
    import torchvision

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


def describe_run(
    cfg: Config, data: DataSplits, model: nn.Module, pre: Preprocessing | None
) -> dict[str, Any]:
    """What every checkpoint of a run says about itself besides its weights."""
    c, h, w = data.shape
    folder = data.files is not None
    crop_pct = data.input_size[0] / data.stored_size[0] if folder else 1.0
    return {
        "model": {
            "name": cfg.model.name,
            "arch": getattr(model, "arch", None),
            "head": cfg.model.head,
            "num_classes": len(data.classes),
            "in_chans": c,
            "input_size": [h, w],
        },
        "classes": list(data.classes),
        "preprocessing": {
            "channels": c,
            "size": [h, w],
            "mean": list(data.mean),
            "std": list(data.std),
            "resize": "shorter-side" if folder else "stretch",
            "crop_pct": round(crop_pct, 4),
            "interpolation": pre.interpolation if pre else "bicubic" if folder else "bilinear",
        },
        "config": cfg.to_dict(),
        "data": {
            "name": data.name,
            "root": data.root,
            "train": len(data.train),
            "val": len(data.val) if data.val is not None else 0,
            "test": len(data.test) if data.test is not None else 0,
        },
    }


def checkpoint_payload(
    description: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    epoch: int,
    metrics: dict | None,
    train_state: dict | None = None,
) -> dict[str, Any]:
    """A checkpoint's content: the run's description, the weights after ``epoch`` epochs
    (counted across stages), that epoch's metrics and, for last.pt, the training state."""
    payload = {**description, "state_dict": state_dict, "epoch": epoch, "metrics": metrics}
    if train_state is not None:
        payload["train_state"] = train_state
    return payload


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` with the format, versions and date, atomically."""
    payload = {
        "format": FORMAT,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **payload,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def _format_version(ckpt: Any) -> int | None:
    """The schema version of a loaded file, or None when it is no cnnkit checkpoint."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("format"), str):
        return None
    name, _, version = ckpt["format"].partition("/")
    if name != FORMAT_NAME:
        return None
    if not version.isdigit():
        return -1  # a cnnkit checkpoint with a version this code cannot even parse
    return int(version)


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
    version = _format_version(ckpt)
    if version is None:
        raise ValueError(f"{path}: not a cnnkit checkpoint (format {FORMAT} expected)")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version} was written by a newer cnnkit; "
            f"this cnnkit ({__version__}) reads versions up to {FORMAT_VERSION}. "
            "Upgrade cnnkit (pip install -U cnnkit) to load it."
        )
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: unknown checkpoint format '{ckpt['format']}'; this cnnkit "
            f"({__version__}) reads " + ", ".join(f"{FORMAT_NAME}/{v}" for v in READABLE_VERSIONS)
        )
    return ckpt


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint's fields, by name (the raw dict is ``load_checkpoint``'s)."""

    path: Path
    config: dict[str, Any]
    classes: list[str]
    preprocessing: dict[str, Any]
    model: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    epoch: int | None
    created: str | None
    versions: dict[str, str]
    train_state: dict | None

    @property
    def provenance(self) -> dict[str, Any]:
        """Which weights these are: epoch, creation date, versions."""
        return {"epoch": self.epoch, "created": self.created, "versions": self.versions}

    def build_model(self) -> nn.Module:
        """The model this checkpoint describes, with its weights, in eval mode."""
        return model_from_checkpoint({"model": self.model, "state_dict": self.state_dict})


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and check a checkpoint file (see ``load_checkpoint``) as a ``Checkpoint``."""
    ckpt = load_checkpoint(path, map_location)
    return Checkpoint(
        path=Path(path),
        config=ckpt["config"],
        classes=list(ckpt["classes"]),
        preprocessing=ckpt["preprocessing"],
        model=ckpt["model"],
        state_dict=ckpt["state_dict"],
        epoch=ckpt.get("epoch"),
        created=ckpt.get("created"),
        versions=ckpt.get("versions") or {},
        train_state=ckpt.get("train_state"),
    )


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights."""
    spec = ckpt["model"]
    model = create_model(
        spec.get("arch") or spec["name"],
        spec["num_classes"],
        spec["in_chans"],
        tuple(spec["input_size"]),
        head=spec.get("head"),
    )
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
