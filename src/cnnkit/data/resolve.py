"""A config's data: the built-in set or the folder / CSV list it names, prepared for the
model (decoded at its input size, normalised as its weights expect), or reloaded exactly
as a run was trained on it (its split file and its checkpoint's preprocessing)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cnnkit.config import Config
from cnnkit.models.pretrained import is_backbone_name
from cnnkit.models.weights import Preprocessing, preprocessing_for

from . import is_builtin, load_dataset
from .builtin import user_cache_dir
from .corrections import read_corrections
from .folder import (
    FOLDER_IMAGE_SIZE,
    DecodedWontFit,
    display_name,
    exclusive,
    find_data_path,
    list_images,
    load_folder,
)
from .memory import DataSplits
from .pack import pack, refuse_multilabel
from .shards import INDEX_FILE, is_shard_set, read_shard_set
from .stream import load_streamed

__all__ = ["FOLDER_IMAGE_SIZE", "load_data", "load_trained_data", "weights_preprocessing"]


def weights_preprocessing(cfg: Config) -> Preprocessing | None:
    """The preprocessing pretrained weights need, or None when training from scratch."""
    m = cfg.model
    if not (m.pretrained or m.weights) or not is_backbone_name(m.name):
        return None
    return preprocessing_for(m.name, m.pretrained, m.weights)


def load_data(
    cfg: Config,
    pre: Preprocessing | None,
    split_file: Path | None = None,
    preprocessing: dict | None = None,
) -> DataSplits:
    """The run's data: a built-in set, a folder/CSV (decoded at the model's input size), or
    a shard set (streamed by training, evaluation and the report alike).

    ``split_file``: a run's split.json, used when it exists. ``preprocessing``: a
    checkpoint's, to reload exactly the data a run was trained on.
    """
    d = cfg.data
    corrections = read_corrections(d.relabel, d.exclude)
    if corrections is not None and (is_shard_set(d.name) or d.stream):
        raise ValueError(
            "--relabel / --exclude apply to a built-in set, folder or CSV list loaded into "
            "memory; for shards, correct the folder and pack it again"
        )
    if is_shard_set(d.name):
        return _load_shards(cfg, d.name, pre, preprocessing)
    if d.stream and not is_builtin(d.name):
        return _stream_folder(cfg, pre, preprocessing, "--stream")
    if is_builtin(d.name):
        data = load_dataset(
            d.name,
            data_dir=d.data_dir,
            val_split=d.val_split,
            seed=cfg.train.seed,
            limit=d.limit,
            corrections=corrections,
        )
    else:
        # The size and channels a run was trained at, a backbone's own (3 channels), or,
        # training from scratch, --image-size if given, the rest inferred from the images
        # (load_folder: 1 channel for grayscale ones, a smaller size for small ones).
        if preprocessing is not None:
            size, crop_pct = preprocessing["size"][0], preprocessing.get("crop_pct", 1.0)
            channels = preprocessing.get("channels", 3)
        elif pre is not None:
            size, crop_pct, channels = d.image_size or pre.size[0], pre.crop_pct, 3
        else:
            size, crop_pct, channels = d.image_size, 1.0, None
        try:
            data = _load_folder(cfg, size, channels, crop_pct, split_file, corrections)
        except DecodedWontFit as e:
            return _stream_folder(cfg, pre, preprocessing, str(e))
    if preprocessing is not None:
        data.mean, data.std = tuple(preprocessing["mean"]), tuple(preprocessing["std"])
    elif pre is not None:  # normalise as the backbone's weights were trained
        data.mean, data.std = pre.mean, pre.std
    return data


def _load_folder(cfg: Config, size, channels, crop_pct, split_file, corrections) -> DataSplits:
    d = cfg.data
    return load_folder(
        d.name,
        image_size=size,
        channels=channels,
        crop_pct=crop_pct,
        val_split=d.val_split,
        test_split=d.test_split,
        seed=cfg.train.seed,
        limit=d.limit,
        split_file=split_file if split_file and split_file.exists() else None,
        corrections=corrections,
        task=d.task,
    )


def _stream_folder(
    cfg: Config, pre: Preprocessing | None, preprocessing: dict | None, why: str
) -> DataSplits:
    """A folder streamed from shards: packed once into the cache (the same split as the
    folder loader makes: same listing, fractions and seed), then read as a shard set."""
    d = cfg.data
    root = find_data_path(d.name)
    listing = list_images(root, d.task)
    refuse_multilabel(listing, display_name(str(root)))
    h = hashlib.sha256(f"{root.resolve()}|{d.val_split}|{d.test_split}|{cfg.train.seed}".encode())
    for split, files in sorted(listing.splits.items()):
        for path, label in files:
            stat = path.stat()
            h.update(f"{split}|{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    out = user_cache_dir() / "shards" / h.hexdigest()[:32]
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out.parent / f".{out.name}.lock"):  # one packer per machine
        if not (out / INDEX_FILE).exists():
            pack(
                str(root),
                out,
                val_split=d.val_split,
                test_split=d.test_split,
                seed=cfg.train.seed,
                overwrite=True,
            )
    data = _load_shards(cfg, str(out), pre, preprocessing)
    data.notes.insert(0, f"streaming ({why}): {display_name(str(root))} packed to shards in {out}")
    data.name = display_name(root.name)
    return data


def load_trained_data(cfg: Config, preprocessing: dict, split_file: Path) -> DataSplits:
    """Exactly the data a run was trained on: same split (its split.json, or the same seed
    and fraction), same input size and normalisation (its checkpoint's preprocessing)."""
    return load_data(cfg, None, split_file=split_file, preprocessing=preprocessing)


def _load_shards(
    cfg: Config, name: str, pre: Preprocessing | None, preprocessing: dict | None
) -> DataSplits:
    """A shard set: at the size and channels a run was trained at, a backbone's, or the
    ones its index suggests (--image-size first)."""
    if cfg.data.limit is not None:
        raise ValueError(
            "--limit takes a subset of a data set in memory; a shard set streams whole: "
            "pack a subset instead (cnnkit datasets pack ... with a smaller source)"
        )
    shards = read_shard_set(name)
    if preprocessing is not None:
        size, crop_pct = preprocessing["size"][0], preprocessing.get("crop_pct", 1.0)
        channels = preprocessing.get("channels", 3)
        normalization = (preprocessing["mean"], preprocessing["std"])
    elif pre is not None:
        size, crop_pct, channels = cfg.data.image_size or pre.size[0], pre.crop_pct, 3
        normalization = (pre.mean, pre.std)
    else:
        size = cfg.data.image_size or shards.image_size or FOLDER_IMAGE_SIZE
        crop_pct, channels, normalization = 1.0, shards.channels, None
    return load_streamed(
        shards, size=size, channels=channels, crop_pct=crop_pct, normalization=normalization
    )
