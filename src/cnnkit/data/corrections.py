"""Label corrections: ``cnnkit train --relabel FILE`` and ``--exclude FILE``.

Both read a CSV with a ``file`` column, as ``cnnkit datasets audit`` writes it (audit.csv):
``--relabel`` trains each listed image with the class in its ``label`` column, ``--exclude``
leaves each listed image out. ``file`` names an image as the audit does: its path under the
data set's folder (or as a CSV list gives it), or ``train/<index>`` for a built-in set (the
index in its official training files). The corrections are applied before the split is
made, so a corrected set is split as any other; the run's config.yaml records the files.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Corrections:
    relabel: dict[str, str] = field(default_factory=dict)  # file -> class name
    exclude: set[str] = field(default_factory=set)

    def describe(self) -> str:
        parts = []
        if self.relabel:
            parts.append(f"{len(self.relabel):,} relabelled")
        if self.exclude:
            parts.append(f"{len(self.exclude):,} excluded")
        return "label corrections: " + ", ".join(parts)


def _rows(path: str, columns: tuple[str, ...], flag: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(
                    f"{flag} {path}: no column {', '.join(missing)}; it needs a header with "
                    f"{', '.join(columns)} (as audit.csv from 'cnnkit datasets audit' has)"
                )
            return [row for row in reader if (row.get("file") or "").strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file") from None


def read_corrections(relabel: str | None, exclude: str | None) -> Corrections | None:
    """The corrections of the two settings, or None when neither is given."""
    if not relabel and not exclude:
        return None
    out = Corrections()
    if relabel:
        for row in _rows(relabel, ("file", "label"), "--relabel"):
            out.relabel[row["file"].strip()] = row["label"].strip()
    if exclude:
        out.exclude = {row["file"].strip() for row in _rows(exclude, ("file",), "--exclude")}
    both = out.exclude & set(out.relabel)
    if both:
        raise ValueError(
            f"{len(both)} file(s) are both relabelled and excluded, e.g. {sorted(both)[0]}: "
            "list each in one of the two files"
        )
    return out


def _class_index(classes: list[str], name: str, file: str) -> int:
    if name not in classes:
        raise ValueError(
            f"--relabel: {file} gets the class '{name}', which the data set does not have "
            f"(its classes: {', '.join(classes[:20])})"
        )
    return classes.index(name)


def _unknown(names: set[str], known: set[str], what: str) -> None:
    missing = sorted(names - known)
    if missing:
        raise ValueError(
            f"{len(missing)} file(s) in the corrections are not in {what}, e.g. "
            f"{', '.join(missing[:3])}: the file column names images as the audit does"
        )


def apply_to_builtin(
    corrections: Corrections, labels: np.ndarray, classes: list[str], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the training images kept, their labels) of a built-in set."""
    labels = labels.copy()
    known = {f"train/{i}" for i in range(len(labels))}
    _unknown(set(corrections.relabel) | corrections.exclude, known, f"{name}'s training set")
    for file, label in corrections.relabel.items():
        labels[int(file.split("/", 1)[1])] = _class_index(classes, label, file)
    dropped = {int(f.split("/", 1)[1]) for f in corrections.exclude}
    keep = np.array([i for i in range(len(labels)) if i not in dropped], dtype=np.int64)
    return keep, labels[keep]


def apply_to_files(
    corrections: Corrections,
    splits: dict[str, list[tuple[Path, int]]],
    root: Path,
    classes: list[str],
) -> dict[str, list[tuple[Path, int]]]:
    """The listed files of a folder or CSV set with the corrections applied."""

    def name(path: Path) -> str:
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    known = {name(p) for files in splits.values() for p, _ in files}
    _unknown(set(corrections.relabel) | corrections.exclude, known, str(root))
    out = {}
    for split, files in splits.items():
        kept = []
        for path, label in files:
            key = name(path)
            if key in corrections.exclude:
                continue
            if key in corrections.relabel:
                label = _class_index(classes, corrections.relabel[key], key)
            kept.append((path, label))
        out[split] = kept
    return out
