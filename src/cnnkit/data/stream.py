"""Streaming a split from WebDataset shards (shards.py): for data that does not fit in
memory or on the local disk. Decoding happens in DataLoader worker processes; batches
arrive as uint8 tensors and are augmented on the device as in memory.

Who reads what, each epoch:

- The shards are taken in an order drawn from (seed, epoch), the same on every process.
  A sample's *position* is its place in that order (the index's counts give each shard's
  first position without reading it).
- Rank r keeps the samples whose position is r modulo the world size: every sample
  belongs to exactly one rank, and the ranks' counts differ by at most one. (Each rank
  reads every shard and decodes only its own samples: decoding, not reading, is what
  costs.)
- The DataLoader workers of a rank split the shards between them (worker w takes every
  w-th shard of the order), so no sample is read twice by one rank.
- Each worker shuffles through a buffer seeded by (seed, epoch, rank, worker).
- Batches are made in the rank's main process from the chunks of samples its workers
  send (in turn), so a rank's batches are all full but its last: ceil(its samples /
  batch) of them, the same every epoch.
- The uneven tail: ranks' counts differ by at most one, so their last batches may differ
  in size, and a rank that has run out takes part in the remaining steps with an empty
  batch; the step's loss is divided by the images of all ranks together (train.loop).
  Every sample is trained on exactly once per epoch, none twice, none padded.

The order of batches of a rank is a function of (seed, epoch, rank, world size, workers):
an interrupted epoch is resumed exactly by skipping the batches it had trained on (they
are decoded again, not trained on), when the world size and the workers are the same.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import is_builtin
from .decode import ImageReadError
from .memory import DataSplits, ImageTensors, channel_stats
from .shards import ShardSet, ShardSplit, decode_sample, iter_shard

SHUFFLE_BUFFER = 2000  # samples a worker holds to shuffle: ~100 MB of 3x128x128 uint8
# Samples a worker sends the rank at once: one per message costs more than decoding a
# small image (MNIST streamed at ~400 images/s so); the rank cuts batches out of them.
CHUNK = 64


@dataclass(frozen=True)
class StreamedData:
    """A data set trained from shards: its splits (train and val stream while training;
    test is read by evaluation) and how their images are decoded."""

    splits: dict[str, ShardSplit]
    channels: int
    size: int  # decoded (stored) size, as the folder cache would store it
    workers: int  # decoding processes per rank
    from_builtin: bool = False  # packed from a built-in set (augmented as one: not at all)

    def count(self, split: str) -> int:
        return self.splits[split].count if split in self.splits else 0

    def plan(
        self,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        *,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = False,
    ) -> StreamPlan:
        """What ``rank`` streams of ``split``: shuffled by (seed, epoch) for training, in
        index order otherwise (validation, features)."""
        part = self.splits[split]
        return StreamPlan(part, self.channels, self.size, seed, epoch, rank, world_size, shuffle)


@dataclass(frozen=True)
class StreamPlan:
    """What one epoch of one rank streams."""

    split: ShardSplit
    channels: int
    size: int
    seed: int
    epoch: int
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True


def shard_order(plan: StreamPlan) -> list[int]:
    """The epoch's order of shards: seeded by (seed, epoch), the same on every process;
    the index order when not shuffling (validation, evaluation)."""
    n = len(plan.split.urls)
    if not plan.shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(plan.seed * 1_000_003 + plan.epoch)
    return torch.randperm(n, generator=g).tolist()


def rank_count(split: ShardSplit, rank: int, world_size: int) -> int:
    """Samples of ``split`` that belong to ``rank`` (positions r modulo the world size)."""
    return len(range(rank, split.count, world_size))


class ShardStream(torch.utils.data.IterableDataset):
    """(image uint8 (C, S, S), label) of one rank's samples, decoded in the workers."""

    def __init__(self, plan: StreamPlan):
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Chunks of up to CHUNK samples: (uint8 images (k, C, S, S), labels (k,), each
        sample's position in the split's index order (k,))."""
        samples = []
        for sample in self._ordered():
            samples.append(sample)
            if len(samples) == CHUNK:
                yield _stacked(samples)
                samples = []
        if samples:
            yield _stacked(samples)

    def _ordered(self) -> Iterator[tuple[np.ndarray, int, int]]:
        plan = self.plan
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = shard_order(plan)
        starts, position = {}, 0
        for s in order:  # each shard's first position in this epoch's order
            starts[s], position = position, position + plan.split.counts[s]
        mine = order[worker::workers]
        samples = self._samples(mine, starts)
        if not plan.shuffle:
            yield from samples
            return
        rng = random.Random(hash((plan.seed, plan.epoch, plan.rank, worker)))
        yield from _shuffled(samples, rng, SHUFFLE_BUFFER)

    def _samples(self, shards: list[int], starts: dict[int, int]):
        plan = self.plan
        first = index_starts(plan.split)
        for s in shards:
            url = plan.split.urls[s]
            for i, (key, data, label) in enumerate(iter_shard(url)):
                if (starts[s] + i) % plan.world_size != plan.rank:
                    continue
                try:
                    yield decode_sample(data, plan.channels, plan.size), label, first[s] + i
                except ImageReadError as e:  # reported, never the end of an epoch
                    import warnings

                    warnings.warn(f"skipped sample {key} of {url}: {e}", stacklevel=1)


def index_starts(split: ShardSplit) -> list[int]:
    """Each shard's first position in the split's index order."""
    return list(itertools.accumulate(split.counts[:-1], initial=0))


def sample_name(url: str, key: str) -> str:
    """How a sample is named to a person: '<shard file>:<key>' (as the doctor names it)."""
    return f"{url.rstrip('/').rsplit('/', 1)[-1]}:{key}"


def _stacked(samples: list[tuple[np.ndarray, int, int]]):
    # tensors travel to the rank through shared memory
    images, labels, positions = zip(*samples, strict=True)
    return (
        torch.from_numpy(np.stack(images)),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(positions, dtype=torch.long),
    )


def _shuffled(samples, rng: random.Random, buffer_size: int):
    """A shuffle buffer: hold up to ``buffer_size`` samples, give out a random one as each
    new one arrives, then the rest in random order."""
    buffer = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def stream_batches(
    plan: StreamPlan, batch_size: int, workers: int, skip: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of one rank: (uint8 images (B, C, S, S), labels) batches, all of
    ``batch_size`` but the last; ``skip`` batches left out at the start (a resumed epoch:
    their samples are decoded again, not given)."""
    images, labels, held, made = [], [], 0, 0
    for chunk_images, chunk_labels, _ in _chunks(plan, workers):
        images.append(chunk_images)
        labels.append(chunk_labels)
        held += len(chunk_labels)
        while held >= batch_size:
            all_images, all_labels = torch.cat(images), torch.cat(labels)
            if made >= skip:
                yield all_images[:batch_size], all_labels[:batch_size]
            images, labels = [all_images[batch_size:]], [all_labels[batch_size:]]
            held, made = held - batch_size, made + 1
    if held and made >= skip:
        yield torch.cat(images), torch.cat(labels)


def split_chunks(data: StreamedData, split: str) -> Iterator[tuple[torch.Tensor, ...]]:
    """Every sample of a split, once, decoded by the workers (evaluation, the report):
    (uint8 images, labels, positions) chunks, in the order the workers deliver them; a
    position names its sample (``read_samples``). A sample that does not decode is left out
    with a warning naming it."""
    plan = data.plan(split)
    yield from _chunks(plan, min(data.workers, len(plan.split.urls)))


def _chunks(plan: StreamPlan, workers: int) -> torch.utils.data.DataLoader:
    """The chunks of ``plan`` as ``workers`` decoding processes deliver them (batches are
    cut out of them by the caller: see above)."""
    return torch.utils.data.DataLoader(
        ShardStream(plan),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )


def read_samples(
    data: StreamedData, split: str, positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images, labels, names) of the samples at ``positions`` (index order) of a
    split, in the order asked: only the shards that hold them are read (a report's
    galleries, an export's check images)."""
    part = data.splits[split]
    wanted = set(positions)
    found: dict[int, tuple[np.ndarray, int, str]] = {}
    for url, first, count in zip(part.urls, index_starts(part), part.counts, strict=True):
        if not any(first <= p < first + count for p in wanted):
            continue
        for i, (key, raw, label) in enumerate(iter_shard(url)):
            if first + i in wanted:
                image = decode_sample(raw, data.channels, data.size)
                found[first + i] = image, label, sample_name(url, key)
    missing = wanted - found.keys()
    if missing:
        raise ValueError(
            f"{split} split: sample #{min(missing)} is not in its shards any more (they "
            "changed since the run was trained?); pack the data set again and retrain"
        )
    shape = (0, data.channels, data.size, data.size)
    images = [found[p][0] for p in positions]
    stacked = np.stack(images) if images else np.zeros(shape, np.uint8)
    labels = torch.tensor([found[p][1] for p in positions], dtype=torch.long)
    return torch.from_numpy(stacked), labels, [found[p][2] for p in positions]


def epoch_steps(split: ShardSplit, world_size: int, batch_size: int) -> int:
    """Steps of an epoch: the batches of the rank with the most samples (rank 0)."""
    return math.ceil(rank_count(split, 0, world_size) / batch_size)


def default_workers() -> int:
    """Decoding processes per rank: the cores of this machine shared by its ranks."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (cores or 1) // ranks)


# How many training samples the channel statistics of a from-scratch run are taken from:
# the whole set would mean decoding it once more before training.
STATS_SAMPLES = 2000


def load_streamed(
    shards: ShardSet,
    *,
    size: int,
    channels: int,
    crop_pct: float = 1.0,
    normalization: tuple | None = None,
) -> DataSplits:
    """A shard set as DataSplits that stream: the train and val splits are read during
    training (``streamed``), the test split by evaluation. ``normalization``: (mean, std)
    of pretrained weights; else the training split's, from its first STATS_SAMPLES."""
    stored = round(size / crop_pct)
    placeholder = ImageTensors(
        torch.empty((0, channels, stored, stored), dtype=torch.uint8),
        torch.empty(0, dtype=torch.long),
    )
    streamed = StreamedData(
        {s: shards.splits[s] for s in ("train", "val", "test") if s in shards.splits},
        channels,
        stored,
        default_workers(),
        from_builtin=is_builtin(str(shards.index.get("source", ""))),
    )
    if normalization is None:
        normalization = channel_stats(_first_images(streamed, STATS_SAMPLES))
    train = shards.splits["train"]
    note = (
        f"streaming {train.count:,} training images from {len(train.urls)} shard(s), decoded "
        f"at {stored}x{stored} by {streamed.workers} worker process(es)"
        + (", validation streamed too" if "val" in streamed.splits else "")
    )
    return DataSplits(
        name=shards.location.rstrip("/").rsplit("/", 1)[-1] or shards.location,
        classes=list(shards.classes),
        train=placeholder,
        val=None,
        test=None,
        mean=tuple(normalization[0]),
        std=tuple(normalization[1]),
        notes=[note],
        input_size=(size, size),
        streamed=streamed,
    )


def _first_images(data: StreamedData, limit: int) -> torch.Tensor:
    images = []
    for url in data.splits["train"].urls:
        for _, raw, _ in iter_shard(url):
            try:
                images.append(decode_sample(raw, data.channels, data.size))
            except ImageReadError:
                continue
            if len(images) >= limit:
                return torch.from_numpy(np.stack(images))
    return torch.from_numpy(np.stack(images))
