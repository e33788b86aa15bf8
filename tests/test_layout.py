"""DataLayout: which shards each rank reads; validation says what is wrong."""

import pickle

import pytest

from sparkml_dist.data.layout import DataLayout


def test_one_per_rank_maps_shard_r_to_rank_r():
    layout = DataLayout.one_per_rank(3)
    assert layout.num_shards == 3 and layout.world_size == 3
    assert layout.shards_of_rank == ((0,), (1,), (2,))
    assert [layout.rank_of_shard(s) for s in range(3)] == [0, 1, 2]


def test_ranks_may_read_several_shards_or_none():
    layout = DataLayout(5, ((), (0, 3), (1, 2, 4)))
    assert layout.world_size == 3
    assert [layout.rank_of_shard(s) for s in range(5)] == [1, 2, 2, 1, 2]
    assert pickle.loads(pickle.dumps(layout)) == layout
    assert pickle.loads(pickle.dumps(layout)).rank_of_shard(4) == 2
    with pytest.raises(ValueError, match=r"shard 7 is not in this layout \(shards are 0..4\)"):
        layout.rank_of_shard(7)


@pytest.mark.parametrize("num_shards, ranks, message", [
    (0, ((),), r"num_shards must be an int >= 1; got 0"),
    (2, (), r"shards_of_rank is empty"),
    (2, ((0,), (0, 1)), r"shard 0 is listed by rank 0 and rank 1"),
    (2, ((0,), (2,)), r"rank 1 lists shard 2; shard ids must be ints in 0..1"),
    (3, ((0,), (1,)), r"shards \[2\] are read by no rank"),
    (3, ((2, 0), (1,)), r"rank 0 lists shards \(2, 0\); list them in ascending order"),
])
def test_invalid_layouts_say_what_is_wrong(num_shards, ranks, message):
    with pytest.raises(ValueError, match=message):
        DataLayout(num_shards, ranks)


def test_one_per_rank_needs_a_positive_world_size():
    with pytest.raises(ValueError, match="world size must be an int >= 1; got 0"):
        DataLayout.one_per_rank(0)
