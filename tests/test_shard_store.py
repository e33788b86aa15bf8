import numpy as np
import pyarrow as pa
import pytest

from sparkml_dist.data.shard_store import FEATURES, LABEL, ROW, SHARD, SPLIT, ShardBuilder


def _batches(n=1000, width=8, batch=128, shard=0, arrival=None):
    """Rows 0..n-1 of one shard as record batches, in row order or in the order ``arrival``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, width)).astype(np.float32)
    y = rng.integers(0, 3, size=n)
    split = (np.arange(n) % 5 == 0).astype(np.int8)
    at = np.arange(n) if arrival is None else arrival
    out = []
    for s in range(0, n, batch):
        sl = at[s:s + batch]
        out.append(pa.RecordBatch.from_arrays(
            [pa.array(list(x[sl]), type=pa.list_(pa.float32())), pa.array(y[sl]),
             pa.array(np.arange(n)[sl]), pa.array(np.full(len(y[sl]), shard, np.int32)),
             pa.array(split[sl])],
            names=[FEATURES, LABEL, ROW, SHARD, SPLIT]))
    return x, y, split, out


@pytest.mark.parametrize("budget", [1 << 30, 4096])
def test_shard_store_gathers_rows_in_memory_and_spilled(budget, tmp_path):
    x, y, split, batches = _batches()
    b = ShardBuilder(8, budget, str(tmp_path))
    b.expected_shard = 0
    train, val = b.extend(batches).finish()
    assert (train.spilled_path is not None) == (budget == 4096)
    if train.spilled_path:
        # Spilled to a raw float32 file in spill_dir, memory-mapped, and unlinked right away so
        # the space is freed when the task ends; the mapping keeps the data readable.
        assert train.spilled_path.startswith(str(tmp_path)) and train.spilled_path.endswith(".f32")
        assert not list(tmp_path.glob("*.arrow"))
    tx, ty = x[split == 0], y[split == 0]
    assert len(train) == len(tx) and len(val) == int(split.sum())
    idx = np.array([5, 0, len(tx) - 1, 300, 5])
    gx, gy = train.gather(idx)
    np.testing.assert_array_equal(gx.numpy(), tx[idx])
    np.testing.assert_array_equal(gy.numpy(), ty[idx])
    np.testing.assert_array_equal(train.row_ids(), np.arange(1000)[split == 0])
    assert sum(len(bx) for bx, _ in val.iter_batches(64)) == len(val)


@pytest.mark.parametrize("budget", [1 << 30, 4096])
def test_rows_arriving_out_of_order_are_held_in_row_order(budget, tmp_path):
    """The prepared frame is not sorted within its partitions: rows arrive as interleaved
    ascending runs (one per upstream partition). Gathers, evaluation batches and row ids are
    those of rows that arrived in order, in memory and spilled."""
    n = 1000
    runs = [np.arange(n)[k::3] for k in range(3)]  # three ascending runs, interleaved by batch
    arrival = np.concatenate([r[i:i + 50] for i in range(0, n, 50) for r in runs])
    x, y, split, batches = _batches(n=n, batch=96, arrival=arrival)
    _, _, _, in_order = _batches(n=n, batch=96)
    got = ShardBuilder(8, budget, str(tmp_path)).extend(batches).finish()
    want = ShardBuilder(8, 1 << 30).extend(in_order).finish()
    assert (got[0].spilled_path is not None) == (budget == 4096)
    for g, w, sp in zip(got, want, (0, 1)):
        np.testing.assert_array_equal(g.row_ids(), np.arange(n)[split == sp])
        idx = np.random.default_rng(1).permutation(len(w))
        for a, b in zip(g.gather(idx), w.gather(idx)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        for (gx, gy), (wx, wy) in zip(g.iter_batches(64), w.iter_batches(64), strict=True):
            np.testing.assert_array_equal(gx.numpy(), wx.numpy())
            np.testing.assert_array_equal(gy.numpy(), wy.numpy())
        # Storage positions (what the GPU-resident feed indexes) name the same rows.
        np.testing.assert_array_equal(g.features[g.physical(idx)], x[g.row_ids()[idx]])


def test_a_row_number_received_twice_is_an_error():
    _, _, _, batches = _batches(n=200, batch=64, arrival=np.r_[np.arange(100, 200), np.arange(100)])
    _, _, _, again = _batches(n=200, batch=64)
    with pytest.raises(AssertionError, match="the same row number twice"):
        ShardBuilder(8, 1 << 30).extend(batches + again[:1]).finish()


def test_rows_of_another_shard_are_rejected():
    *_, batches = _batches(shard=1)
    b = ShardBuilder(8, 1 << 30)
    b.expected_shard = 0
    with pytest.raises(AssertionError, match="rank 0 received rows of shard 1"):
        b.extend(batches)


def _shard_batches(shards, n=600, width=4, batch=50):
    """Rows 0..n-1 of the given shards (row % 3 picks the shard), sorted by (shard, split, row)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, width)).astype(np.float32)
    shard = (np.arange(n) % 3).astype(np.int32)
    split = (np.arange(n) % 7 == 0).astype(np.int8)
    keep = np.isin(shard, shards)
    order = np.lexsort((np.arange(n), split, shard))
    order = order[keep[order]]
    out = []
    for s in range(0, len(order), batch):
        i = order[s:s + batch]
        out.append(pa.RecordBatch.from_arrays(
            [pa.array(list(x[i]), type=pa.list_(pa.float32())), pa.array(np.arange(n)[i] * 10),
             pa.array(np.arange(n)[i]), pa.array(shard[i]), pa.array(split[i])],
            names=[FEATURES, LABEL, ROW, SHARD, SPLIT]))
    return x, shard, split, out


@pytest.mark.parametrize("budget", [1 << 30, 2048])
def test_builder_splits_several_shards_and_keeps_empty_ones(budget, tmp_path):
    x, shard, split, batches = _shard_batches((0, 2))
    b = ShardBuilder(4, budget, str(tmp_path), expected_shards=(0, 1, 2))
    stores = b.extend(batches).finish_shards()
    assert sorted(stores) == [0, 1, 2]
    assert len(stores[1][0]) == 0 and len(stores[1][1]) == 0  # expected but absent: empty
    for s in (0, 2):
        for sp in (0, 1):
            rows = np.flatnonzero((shard == s) & (split == sp))
            store = stores[s][sp]
            np.testing.assert_array_equal(store.row_ids(), rows)
            gx, gy = store.gather(np.arange(len(store))[::-1])
            np.testing.assert_array_equal(gx.numpy(), x[rows][::-1])
            np.testing.assert_array_equal(gy.numpy(), rows[::-1] * 10)


def _without_shard(batches):
    return [b.drop_columns([SHARD]) for b in batches]


@pytest.mark.parametrize("budget", [1 << 30, 2048])
def test_builder_derives_the_shard_from_the_row_when_batches_carry_none(budget, tmp_path):
    *_, batches = _shard_batches((0, 2))
    want = ShardBuilder(4, 1 << 30, expected_shards=(0, 1, 2)).extend(batches).finish_shards()
    got = ShardBuilder(4, budget, str(tmp_path), expected_shards=(0, 1, 2), num_shards=3
                       ).extend(_without_shard(batches)).finish_shards()
    assert sorted(got) == sorted(want) == [0, 1, 2]
    for s in (0, 1, 2):
        for sp in (0, 1):
            np.testing.assert_array_equal(got[s][sp].row_ids(), want[s][sp].row_ids())
            everything = np.arange(len(want[s][sp]))
            for g, w in zip(got[s][sp].gather(everything), want[s][sp].gather(everything)):
                np.testing.assert_array_equal(g.numpy(), w.numpy())
    # The derived shard is checked like a carried one; without num_shards rows of several
    # shards cannot be told apart.
    with pytest.raises(AssertionError, match=r"received rows of shard 1"):
        ShardBuilder(4, 1 << 30, expected_shards=(0, 2), num_shards=3).extend(
            _without_shard(_shard_batches((0, 1))[3]))
    with pytest.raises(ValueError, match="knows no num_shards"):
        ShardBuilder(4, 1 << 30, expected_shards=(0, 2)).extend(_without_shard(batches))


def test_builder_rejects_shards_outside_its_set_and_finish_needs_one():
    *_, batches = _shard_batches((0, 1, 2))
    with pytest.raises(AssertionError, match=r"a rank of shards \(0, 2\) received rows of shard 1"):
        ShardBuilder(4, 1 << 30, expected_shards=(0, 2)).extend(batches)
    b = ShardBuilder(4, 1 << 30, expected_shards=(0, 1, 2)).extend(batches)
    assert b.expected_shards == (0, 1, 2)
    with pytest.raises(ValueError, match=r"call finish_shards\(\)"):
        b.finish()
    one = ShardBuilder(4, 1 << 30)
    one.expected_shard = 1  # the single-shard alias
    assert one.expected_shards == (1,)
    train, val = one.extend(_shard_batches((1,))[3]).finish()
    assert len(train) + len(val) == 200
