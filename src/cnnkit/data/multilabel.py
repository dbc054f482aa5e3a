"""Multi-label data: label sets, splits that keep every label in every split, and a
multi-label set made from MNIST digits.

A label set is written in one cell of a CSV/TSV list, its labels separated by ``;``
(``cat;dog``); an empty cell is an image with no label. In memory a split's labels are an
(N, K) 0/1 matrix over the sorted label names.

Splits use iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the
Stratification of Multi-label Data", ECML PKDD 2011): the rarest label's images are placed
first, each in the split that still needs most of that label (a split without the label
yet before any other: a departure from the paper, so that a label with as many images as
there are splits reaches every one). A plain random split loses rare labels from
the validation split, and stratifying on whole label sets fails when most sets are unique.
"""

from __future__ import annotations

import numpy as np

SEPARATOR = ";"


def parse_labels(cell: str, separator: str = SEPARATOR) -> list[str]:
    """The labels of one cell: split on ``separator``, blanks around each dropped, empty
    parts and repeats left out, in the order given. An empty cell: no label."""
    out: list[str] = []
    for part in cell.split(separator):
        label = part.strip()
        if label and label not in out:
            out.append(label)
    return out


def targets_of(label_sets: list[tuple[int, ...]], classes: int) -> np.ndarray:
    """(N, K) float32 0/1 matrix of images' label-index tuples: 1 where the image has the
    label."""
    out = np.zeros((len(label_sets), classes), dtype=np.float32)
    for i, labels in enumerate(label_sets):
        out[i, list(labels)] = 1
    return out


def iterative_split(targets: np.ndarray, fractions: list[float], seed: int = 0) -> list[np.ndarray]:
    """Indices of each part, ``fractions`` of the images each (summing to 1), by iterative
    stratification over the (N, K) 0/1 ``targets``; seeded, sorted."""
    targets = np.asarray(targets).astype(bool)
    n, k = targets.shape
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.min() < 0 or not np.isclose(fractions.sum(), 1):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions.tolist()}")
    rng = np.random.default_rng(seed)
    wanted = fractions * n  # images each part still wants
    wanted_label = fractions[:, None] * targets.sum(0)[None, :]  # per part and label
    have = np.zeros((len(fractions), k))  # images placed per part and label
    part_of = np.full(n, -1)
    order = rng.permutation(n)  # the order images are taken in, seeded
    left = targets[order].copy()
    unplaced = np.ones(n, dtype=bool)

    def place(i: int, candidates: np.ndarray) -> None:
        best = candidates[wanted[candidates] == wanted[candidates].max()]
        part = int(rng.choice(best)) if len(best) > 1 else int(best[0])
        part_of[order[i]] = part
        wanted[part] -= 1
        wanted_label[part] -= targets[order[i]]
        have[part] += targets[order[i]]
        unplaced[i] = False

    while True:
        counts = left[unplaced].sum(0)
        if not counts.any():
            break
        label = int(np.flatnonzero(counts == counts[counts > 0].min())[0])  # the rarest
        for i in np.flatnonzero(unplaced & left[:, label]):
            # a part without this label yet comes first (a label on 3 images reaches all
            # three parts), then the part that still needs most of it
            lacking = np.flatnonzero((have[:, label] == 0) & (fractions > 0))
            parts = lacking if len(lacking) else np.arange(len(fractions))
            need = wanted_label[parts, label]
            place(i, parts[need == need.max()])
    for i in np.flatnonzero(unplaced):  # images with no label: where most images are wanted
        place(i, np.arange(len(fractions)))
    return [np.flatnonzero(part_of == p) for p in range(len(fractions))]


def digit_canvases(
    images: np.ndarray, labels: np.ndarray, count: int, seed: int = 0, size: int = 56
) -> tuple[np.ndarray, list[list[str]]]:
    """``count`` grey canvases of ``size`` x ``size`` holding one or two 28x28 digits from
    ``images`` (uint8, (N, 28, 28)), each digit at a seeded random place (two side by side or
    one above the other, never covering each other), labelled with the digits present. About
    half hold two digits; 1 in 20 holds none (the empty label set)."""
    rng = np.random.default_rng(seed)
    canvases = np.zeros((count, size, size), dtype=np.uint8)
    label_sets: list[list[str]] = []
    room = size - 28
    for c in range(count):
        kind = rng.random()
        picks = [] if kind < 0.05 else rng.choice(len(images), 1 if kind < 0.525 else 2)
        if len(picks) == 1:
            places = [(int(rng.integers(0, room + 1)), int(rng.integers(0, room + 1)))]
        elif len(picks) == 2:
            across, offset = rng.random() < 0.5, int(rng.integers(0, room + 1))
            places = [(offset, 0), (offset, room)] if across else [(0, offset), (room, offset)]
        else:
            places = []
        for i, (y, x) in zip(picks, places, strict=True):
            view = canvases[c, y : y + 28, x : x + 28]
            np.maximum(view, images[i], out=view)
        label_sets.append(sorted({str(int(labels[i])) for i in picks}))
    return canvases, label_sets
