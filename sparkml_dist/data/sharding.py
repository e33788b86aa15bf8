"""Shard arithmetic and per-rank data order. Pure: numpy only, explicit seeds.

Rows are numbered ``0..n-1`` in an order that is random (seeded) and, when stratified, keeps each
class contiguous. Row ``g`` then goes to shard ``g % num_shards``: shard sizes differ by at most one
row, and each class's count per shard is within one row of ``n_class / num_shards``.
"""

from __future__ import annotations

import math

import numpy as np


def group_offsets(counts: dict[object, int]) -> dict[object, int]:
    """Start of each group in a global numbering that lays groups out in sorted key order."""
    offsets: dict[object, int] = {}
    total = 0
    for key in sorted(counts, key=lambda k: (str(type(k)), k)):
        offsets[key] = total
        total += counts[key]
    return offsets


def validation_quota(class_count: int, val_fraction: float) -> int:
    """Rows of one class that go to validation: the nearest whole share (within one row)."""
    return int(math.floor(class_count * val_fraction + 0.5))


def steps_per_epoch(shard_sizes: list[int], batch_size: int) -> int:
    """Steps every rank runs per epoch: enough for the largest shard, so no row is skipped.

    Smaller shards wrap around their own permutation to fill the last batches, so all ranks run
    the same number of equally sized steps and a collective can never wait on a finished rank.
    """
    if not shard_sizes or min(shard_sizes) <= 0:
        raise ValueError(f"every shard needs at least one row; shard sizes are {shard_sizes}")
    return max(1, math.ceil(max(shard_sizes) / batch_size))


def epoch_order(num_rows: int, seed: int, epoch: int, rank: int, length: int) -> np.ndarray:
    """Row indices (into a rank's shard) for one epoch: a permutation, wrapped to ``length``.

    Deterministic in (seed, epoch, rank); independent of world state, so a resumed rank replays
    exactly the order an uninterrupted rank would have used.
    """
    rng = np.random.Generator(np.random.PCG64([seed, epoch, rank, 0x5EED]))
    perm = rng.permutation(num_rows)
    reps = math.ceil(length / num_rows)
    return np.tile(perm, reps)[:length]


def batch_indices(order: np.ndarray, step_in_epoch: int, batch_size: int) -> np.ndarray:
    """Indices of the rows in batch ``step_in_epoch`` of an epoch order."""
    start = step_in_epoch * batch_size
    return order[start:start + batch_size]
