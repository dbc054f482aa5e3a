"""Where a training step's batch comes from, for fit().

In memory (the fast path): an index slice of the epoch's seeded permutation, taken from
the uint8 images on the device. Streamed from shards (data/stream.py): the next batch the
rank's decoding workers made. Either way the batch is converted, augmented and normalised
on the device as whole-batch tensor operations, and comes with the loss's divisor: the
images of the step over all ranks (their class-weight sum with class weights), so that
each rank's summed loss adds up to the whole step's mean (distributed.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from cnnkit.data.stream import stream_batches

from . import distributed

_Setup = Any  # loop._Setup: what fit() prepared (not imported: loop imports this module)
Batch = tuple[torch.Tensor, torch.Tensor, float | torch.Tensor, int]


def _ready(setup: _Setup, x: torch.Tensor, y: torch.Tensor, divisor, size: int) -> Batch:
    """uint8 images on the device -> augmented, normalised floats."""
    normalizer = setup.normalizer
    x = normalizer.to_unit(x)
    if setup.augment is not None and len(x):  # a rank may have no share of a step
        x = setup.augment(x, setup.generator)
    return normalizer.normalize(x), y, divisor, size


def memory_batch(setup: _Setup, perm: torch.Tensor, step: int, device) -> Batch:
    """This rank's share of step ``step`` of the permutation (its images normalised,
    augmented), its labels, the divisor and the step's size."""
    index = perm[step * setup.batch_size : (step + 1) * setup.batch_size]
    size = len(index)
    if setup.loss_weights is None:
        divisor = float(size)
    else:
        labels = setup.train.labels  # on the device, or in host memory with the images
        divisor = setup.loss_weights[labels[index.to(labels.device)].to(device)].sum()
    index = index[distributed.share(len(index), setup.world, minimum=2)]
    train = setup.train
    if setup.resident:
        x, y = train.images[index], train.labels[index]
    else:
        index = index.cpu()
        x = train.images[index].to(device, non_blocking=True)
        y = train.labels[index].to(device, non_blocking=True)
    return _ready(setup, x, y, divisor, size)


def epoch_batches(
    setup: _Setup, perm: torch.Tensor, epoch: int, start: int, seed: int, device
) -> Iterator[Batch]:
    """The batches of one epoch from step ``start`` on (a resumed epoch starts later)."""
    if setup.streamed is None:
        for step in range(start, setup.steps):
            yield memory_batch(setup, perm, step, device)
        return
    yield from _streamed_batches(setup, epoch, start, seed, device)


def rank_batch(batch_size: int, world) -> int:
    """A rank's batch when streaming: its share of the global batch, rounded up."""
    return math.ceil(batch_size / world.size)


def _streamed_batches(setup: _Setup, epoch: int, start: int, seed: int, device):
    """Until every rank has run out: a rank that has, takes part with an empty batch, and
    the step's size is summed over the ranks (one small all-reduce a step)."""
    world, data = setup.world, setup.streamed
    plan = data.plan("train", world.rank, world.size, seed=seed, epoch=epoch, shuffle=True)
    batches = stream_batches(plan, rank_batch(setup.batch_size, world), data.workers, start)
    empty = (
        torch.empty((0, data.channels, data.size, data.size), dtype=torch.uint8),
        torch.empty(0, dtype=torch.long),
    )
    weights = None if setup.loss_weights is None else setup.loss_weights.cpu()
    while True:
        images, labels = next(batches, empty)
        mine = [float(len(labels))]
        if weights is not None:
            mine.append(float(weights[labels].sum()))
        totals = distributed.sum_values(mine, world)
        if totals[0] == 0:
            return
        x = images.to(device, non_blocking=True)
        y = labels.to(device, non_blocking=True)
        yield _ready(setup, x, y, totals[-1], int(totals[0]))
