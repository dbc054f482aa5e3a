"""A multi-label data set made from real images, for tests, benchmarks and the docs:
canvases of one or two MNIST digits, labelled with the digits present (data/multilabel.py
``digit_canvases``), written as PNG files with a multi-label list."""

from __future__ import annotations

from pathlib import Path

from . import load_dataset
from .multilabel import digit_canvases


def write_digit_canvases(folder: Path, train: int, test: int, seed: int = 0) -> Path:
    """A multi-label list (``folder``/labels.csv: path,labels,split) of ``digit_canvases``
    as PNG files: ``train`` canvases from MNIST's training digits, ``test`` from its test
    digits (MNIST from $CNNKIT_DATA, as ``--data mnist`` finds it)."""
    from PIL import Image

    folder = Path(folder)
    mnist = load_dataset("mnist", val_split=0)
    rows = ["path,labels,split"]
    for split, part, count in (("train", mnist.train, train), ("test", mnist.test, test)):
        images, labels = part.images[:, 0].numpy(), part.labels.numpy()
        canvases, sets = digit_canvases(images, labels, count, seed=seed + (split == "test"))
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i, (canvas, names) in enumerate(zip(canvases, sets, strict=True)):
            name = f"{split}/{i:05d}.png"
            Image.fromarray(canvas).save(folder / name)
            rows.append(f"{name},{';'.join(names)},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"
