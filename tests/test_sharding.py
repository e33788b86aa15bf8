import numpy as np
import pytest

from sparkml_dist.data.sharding import (batch_indices, epoch_order, group_offsets, steps_per_epoch,
                                        validation_quota)


def test_epoch_order_is_deterministic_and_covers_every_row():
    a = epoch_order(10, seed=3, epoch=1, rank=0, length=12)
    b = epoch_order(10, seed=3, epoch=1, rank=0, length=12)
    np.testing.assert_array_equal(a, b)
    assert sorted(a[:10]) == list(range(10))  # one full permutation, then wrap-around
    np.testing.assert_array_equal(a[10:], a[:2])
    assert not np.array_equal(a, epoch_order(10, seed=3, epoch=2, rank=0, length=12))
    assert not np.array_equal(a, epoch_order(10, seed=3, epoch=1, rank=1, length=12))


def test_steps_per_epoch_fits_the_largest_shard():
    assert steps_per_epoch([10, 9], 4) == 3
    assert steps_per_epoch([3, 3], 8) == 1
    with pytest.raises(ValueError, match="at least one row"):
        steps_per_epoch([3, 0], 2)


def test_batches_are_equal_sized_on_every_rank():
    sizes = [11, 10, 10]
    steps = steps_per_epoch(sizes, 4)
    for rank, n in enumerate(sizes):
        order = epoch_order(n, 0, 0, rank, steps * 4)
        assert all(len(batch_indices(order, s, 4)) == 4 for s in range(steps))


def test_group_offsets_and_quota():
    assert group_offsets({2: 5, 0: 3, 1: 4}) == {0: 0, 1: 3, 2: 7}
    assert validation_quota(10, 0.25) == 3  # 2.5 rounds to the nearest row
    assert validation_quota(7, 0.2) == 1
