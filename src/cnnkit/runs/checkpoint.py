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
    weights_sha256 (optional: see below)

``weights_sha256`` is a SHA-256 of the state dict (``weights_checksum``), written since
cnnkit 0.2 and checked on every load, so a file whose tensor bytes were damaged on disk is
refused instead of predicting NaN. It stays format version 1: it is an added key that older
readers ignore, and files without it (written before) still load, unchecked. A version bump
would only make older cnnkit refuse files it reads correctly.

A file whose version is newer than this code reads is refused with a clear error; an
older version would be converted here when the schema changes.
"""

from __future__ import annotations

import datetime
import hashlib
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
            **{split: data.count(split) or 0 for split in ("train", "val", "test")},
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


def weights_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: each entry's name, dtype, shape and bytes, in sorted name
    order (so the order the dict was built in does not matter, and the device either)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):  # a plain value some modules keep
            digest.update(f"{name}={tensor!r};".encode())
            continue
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(state_dict[name].shape)};".encode())
        # bytes through a uint8 view: numpy has no bfloat16, uint8 every dtype has
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` with the format, versions, date and (when it holds weights) their
    checksum, atomically."""
    payload = {
        "format": FORMAT,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **payload,
    }
    if isinstance(payload.get("state_dict"), dict):
        payload["weights_sha256"] = weights_checksum(payload["state_dict"])
    atomic_write(path, lambda f: torch.save(payload, f))


def _fallback(path: Path) -> str:
    """What to load instead of a damaged checkpoint, said in the error."""
    if path.name == "best.pt":
        return (
            f"Load {path.with_name('last.pt')} instead (--weights last, or "
            "load_run(run, weights='last')), or retrain."
        )
    if path.name == "last.pt":
        return (
            f"{path.with_name('best.pt')} may still be intact (--weights best); the run "
            "cannot be resumed from this file."
        )
    return "Use another checkpoint of the run, or retrain."


def _verify_weights(path: Path, ckpt: dict) -> None:
    """Refuse a checkpoint whose weights do not match the checksum saved with them."""
    expected = ckpt.get("weights_sha256")
    if expected is None:
        return  # written before checksums (format 1, cnnkit 0.1): nothing to check against
    if weights_checksum(ckpt.get("state_dict") or {}) != expected:
        raise ValueError(
            f"{path}: the weights do not match the checksum saved with them; the file is "
            f"corrupted (damaged on disk or in a copy). {_fallback(path)}"
        )


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
            f"It may be truncated, corrupted or not a cnnkit file. {_fallback(path)}"
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
    _verify_weights(path, ckpt)
    return ckpt


def _identity(file: str, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What an output derived from a checkpoint records of it, to tell later whether the
    file still holds the same weights."""
    return {
        "file": file,
        "epoch": ckpt.get("epoch"),
        "created": ckpt.get("created"),
        "weights_sha256": ckpt.get("weights_sha256"),  # None in files from before checksums
    }


def checkpoint_identity(path: str | Path) -> dict[str, Any] | None:
    """Which weights a checkpoint file holds now (see ``_identity``); None when there is no
    readable file. Memory-mapped and unchecked: only the small fields are read, so this is
    cheap even for a large model (``load_checkpoint`` checks the weights)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if _format_version(ckpt) is None:
        return None
    return _identity(path.name, ckpt)


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
    metrics: dict | None = None  # the metrics.csv row of the epoch these weights are from
    data: dict | None = None  # split sizes when trained: {name, root, train, val, test}
    weights_sha256: str | None = None  # None in files written before checksums
    calibration: dict | None = None  # temperature scaling folded in (runs/calibrate.py)
    rejection: dict | None = None  # the "unknown" threshold (runs/reject.py)
    multilabel: dict | None = None  # several labels per image: the per-label thresholds

    @property
    def provenance(self) -> dict[str, Any]:
        """Which weights these are: epoch, creation date, versions."""
        return {"epoch": self.epoch, "created": self.created, "versions": self.versions}

    @property
    def identity(self) -> dict[str, Any]:
        """What an output derived from these weights records, as ``checkpoint_identity``
        reads it back from the file: {file, epoch, created, weights_sha256}."""
        return _identity(self.path.name, vars(self))  # the fields, by the same names

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
        metrics=ckpt.get("metrics"),
        data=ckpt.get("data"),
        weights_sha256=ckpt.get("weights_sha256"),
        calibration=ckpt.get("calibration"),
        rejection=ckpt.get("rejection"),
        multilabel=ckpt.get("multilabel"),
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
