"""Multi-label data sets made from real images, for tests, benchmarks and the docs, each
written as image files with a multi-label list: canvases of one or two MNIST digits,
labelled with the digits present (data/multilabel.py ``digit_canvases``), and canvases of
a cat, a dog or both side by side from a cats-vs-dogs folder."""

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


PHOTO_SIDE = 112  # each photo's square in a 224x224 canvas, two side by side


def _photo_square(path: Path, side: int):
    """A photo resized (shorter side) and centre-cropped to ``side`` x ``side``, RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.fit(im.convert("RGB"), (side, side), Image.Resampling.BILINEAR)


def write_photo_canvases(folder: Path, source: Path, seed: int = 0) -> Path:
    """A multi-label list (``folder``/labels.csv) of 224x224 canvases made from a
    cats-vs-dogs folder (``source``/train and ``source``/validation, each with cats/ and
    dogs/): a cat, a dog, or one of each side by side, in equal shares, each photo used
    once, at a seeded random half (the other half grey). Canvases from train/ photos are
    the train split, from validation/ the test split."""
    import random

    from PIL import Image

    folder, source = Path(folder), Path(source)
    rng = random.Random(seed)
    rows = ["path,labels,split"]
    for part, split in (("train", "train"), ("validation", "test")):
        cats = sorted((source / part / "cats").glob("*.jpg"))
        dogs = sorted((source / part / "dogs").glob("*.jpg"))
        rng.shuffle(cats)
        rng.shuffle(dogs)
        # a third of each kind's photos alone, the rest in pairs
        alone = min(len(cats), len(dogs)) // 3
        plans = [[("cat", c)] for c in cats[:alone]] + [[("dog", d)] for d in dogs[:alone]]
        pairs = zip(cats[alone:], dogs[alone:], strict=False)  # as many as the fewer kind
        plans += [[("cat", c), ("dog", d)] for c, d in pairs]
        rng.shuffle(plans)
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i, plan in enumerate(plans):
            canvas = Image.new("RGB", (2 * PHOTO_SIDE, 2 * PHOTO_SIDE), (128, 128, 128))
            halves = [0, 1] if len(plan) == 2 else [rng.randrange(2)]
            rng.shuffle(halves)
            for (_, photo), half in zip(plan, halves, strict=True):
                canvas.paste(_photo_square(photo, PHOTO_SIDE), (half * PHOTO_SIDE, PHOTO_SIDE // 2))
            name = f"{split}/{i:05d}.jpg"
            canvas.save(folder / name, quality=92)
            rows.append(f"{name},{';'.join(sorted({kind for kind, _ in plan}))},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"
