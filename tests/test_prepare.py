"""Driver-side preparation on real local Spark: split, shard bounds, bad data."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from sparkml_dist.config import DataConfig
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.data.shard_store import FEATURES, LABEL, ROW, SHARD, SPLIT
from sparkml_dist.errors import DataError
from sparkml_dist.spark.prepare import prepare as _prepare

N = 3  # workers


def prepare(spark, df, cfg, num_workers, seed):
    """One shard per rank, the data-parallel layout; releases nothing (the module's session
    ends with the module)."""
    return _prepare(spark, df, cfg, DataLayout.one_per_rank(num_workers), seed)


@pytest.fixture(scope="module")
def imbalanced(spark):
    # 3 classes with 500 / 97 / 23 rows: strongly imbalanced and not divisible by 3 or 5.
    rng = np.random.default_rng(1)
    rows = []
    for label, count in (("a", 500), ("b", 97), ("c", 23)):
        for _ in range(count):
            rows.append((float(rng.normal()), float(rng.normal()), label))
    return spark.createDataFrame(rows, "x1 double, x2 double, y string")


def _collect(prepared):
    rows = prepared.frame.select(F.spark_partition_id().alias("p"), SHARD, SPLIT, LABEL, ROW).collect()
    return rows


def test_stratified_split_and_shards_meet_one_row_bounds(spark, imbalanced):
    cfg = DataConfig(feature_cols=("x1", "x2"), label_col="y", val_fraction=0.2)
    prepared = prepare(spark, imbalanced, cfg, N, seed=5)
    rows = _collect(prepared)
    assert prepared.classes == ("a", "b", "c")
    totals = Counter(r[LABEL] for r in rows)
    val = Counter(r[LABEL] for r in rows if r[SPLIT] == 1)
    for c, n in totals.items():
        assert abs(val[c] - 0.2 * n) <= 1, (c, val[c], n)  # each class's share within one row
    train = [r for r in rows if r[SPLIT] == 0]
    sizes = Counter(r[SHARD] for r in train)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert tuple(sizes[r] for r in range(N)) == prepared.train_shard_sizes
    val_sizes = Counter(r[SHARD] for r in rows if r[SPLIT] == 1)
    assert tuple(val_sizes[r] for r in range(N)) == prepared.val_shard_sizes
    train_per_class = Counter(r[LABEL] for r in train)
    for c, n in train_per_class.items():
        for shard in range(N):
            got = sum(1 for r in train if r[LABEL] == c and r[SHARD] == shard)
            assert abs(got - n / N) < 1, (c, shard, got, n / N)  # within one row of proportional
    assert all(r["p"] == r[SHARD] for r in rows), "partition r must hold exactly shard r"
    assert len({r[ROW] for r in train}) == len(train)


def test_random_split_and_sharding_sizes(spark, imbalanced):
    cfg = DataConfig(feature_cols=("x1", "x2"), label_col="y", val_fraction=0.25,
                     split="random", sharding="random", random_buckets=7)
    prepared = prepare(spark, imbalanced, cfg, N, seed=5)
    rows = _collect(prepared)
    assert sum(r[SPLIT] for r in rows) == 155  # round(620 * 0.25)
    sizes = Counter(r[SHARD] for r in rows if r[SPLIT] == 0)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert all(r["p"] == r[SHARD] for r in rows)


def test_preparation_is_deterministic_across_recomputation(spark, imbalanced):
    cfg = DataConfig(feature_cols=("x1", "x2"), label_col="y")
    a = prepare(spark, imbalanced, cfg, N, seed=9)
    b = prepare(spark, imbalanced.repartition(5), cfg, N, seed=9)
    key = lambda rows: sorted((r[FEATURES][0], r[SHARD], r[SPLIT], r[ROW]) for r in rows)  # noqa: E731
    cols = [FEATURES, SHARD, SPLIT, ROW]
    assert key(a.frame.select(*cols).collect()) == key(b.frame.select(*cols).collect())


@pytest.mark.parametrize("split, sharding", [("stratified", "stratified"), ("random", "random")])
def test_spark_40_hash_partitioning_places_rows_as_repartition_by_id(spark, imbalanced,
                                                                     monkeypatch, split,
                                                                     sharding):
    # On Spark 4.0 (no repartitionById) rows reach their partitions through hash-aligned keys:
    # the same rows, numbers and partitions.
    import sparkml_dist.spark.prepare as prep

    cfg = DataConfig(feature_cols=("x1", "x2"), label_col="y", split=split, sharding=sharding,
                     random_buckets=7)
    cols = [F.spark_partition_id().alias("p"), FEATURES, LABEL, ROW, SHARD, SPLIT]
    assert prep._by_partition_id(spark)  # the installed Spark has it
    by_id = prepare(spark, imbalanced, cfg, N, seed=3)
    monkeypatch.setattr(prep, "_by_partition_id", lambda spark: False)
    hashed = prepare(spark, imbalanced, cfg, N, seed=3)
    key = lambda p: sorted((r["p"], tuple(r[FEATURES]), r[LABEL], r[ROW], r[SHARD], r[SPLIT])  # noqa: E731
                           for r in p.frame.select(*cols).collect())
    assert key(by_id) == key(hashed)
    assert all(r[0] == r[4] for r in key(hashed))  # partition r holds rank r's shard
    by_id.release()
    hashed.release()


@pytest.fixture(scope="module")
def small(spark):
    return spark.createDataFrame(
        [(1.0, 2.0, "s", [1.0, 2.0], 0), (2.0, None, "t", [3.0, float("nan")], 1),
         (3.0, 4.0, "u", [5.0, 6.0], 0), (float("nan"), 1.0, "v", [7.0, 8.0], 1),
         (5.0, 6.0, "w", [9.0, 1.0], None), (6.0, 7.0, "x", [2.0, 3.0], 1)],
        "a double, b double, s string, arr array<double>, label int")


@pytest.mark.parametrize("cfg_kwargs, message", [
    ({"feature_cols": ("a", "zz")}, r"column 'zz' not found; columns are: a, b, s, arr, label"),
    ({"feature_cols": ("a",), "label_col": "y"}, r"column 'y' not found.*Set data.label_col"),
    ({"feature_cols": ("a", "s")}, r"feature column 's' has type string; features must be numeric"),
    ({"features_col": "s"}, r"features_col 's' has type string; expected an array of numbers"),
    ({"feature_cols": ("a", "b")}, r"3 of 6 rows have null or NaN values \(a: 1, b: 1, label: 1\)"
                                   r".*data.on_invalid=drop"),
    ({"features_col": "arr"}, r"2 of 6 rows have null or NaN values \(arr: 1, label: 1\)"),
    ({}, r"no features configured"),
])
def test_bad_data_fails_before_training_with_a_clear_message(spark, small, cfg_kwargs, message):
    with pytest.raises(DataError, match=message):
        prepare(spark, small, DataConfig(**cfg_kwargs), 2, seed=0)


def test_drop_invalid_rows_and_count_them(spark, small):
    prepared = prepare(spark, small, DataConfig(feature_cols=("a", "b"), on_invalid="drop",
                                                val_fraction=0.0, sharding="random"), 2, seed=0)
    assert prepared.dropped_rows == 3 and sum(prepared.train_shard_sizes) == 3


def test_empty_too_few_rows_and_single_class(spark, small):
    with pytest.raises(DataError, match=r"the dataset is empty \(0 rows\)"):
        prepare(spark, small.limit(0), DataConfig(feature_cols=("a",)), 2, seed=0)
    ok = small.where("label is not null and not isnan(a) and b is not null")
    with pytest.raises(DataError, match=r"2 training rows for training.num_workers=4"):
        prepare(spark, ok, DataConfig(feature_cols=("a", "b"), val_fraction=0.34), 4, seed=0)
    with pytest.raises(DataError, match="has a single class"):
        prepare(spark, ok.where("label = 1"), DataConfig(feature_cols=("a",)), 1, seed=0)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "orc", "table"])
def test_sources_table_and_every_file_format(spark, tmp_path, fmt):
    from sparkml_dist.spark.prepare import read_source

    df = spark.createDataFrame([(float(i), float(i % 3), i % 2) for i in range(12)],
                               "a double, b double, label int")
    if fmt == "table":
        # An external table in tmp_path: nothing left in the working directory's warehouse.
        df.write.mode("overwrite").option("path", str(tmp_path / "table")).saveAsTable(
            "sparkml_dist_src")
        source = "sparkml_dist_src"
    else:
        source = str(tmp_path / f"data.{fmt}")
        writer = df.write.mode("overwrite")
        (writer.option("header", "true") if fmt == "csv" else writer).format(fmt).save(source)
    read = read_source(spark, DataConfig(source=source, feature_cols=("a", "b")))
    prepared = prepare(spark, read, DataConfig(feature_cols=("a", "b"), val_fraction=0.25), 2, 0)
    assert sum(prepared.train_shard_sizes) + sum(prepared.val_shard_sizes) == 12
    assert prepared.in_features == 2 and prepared.classes == (0, 1)


def test_unknown_source_format_is_explained(spark):
    from sparkml_dist.spark.prepare import read_source

    with pytest.raises(DataError, match="cannot tell the format.*set data.format"):
        read_source(spark, DataConfig(source="/data/file.bin", feature_cols=("a",)))


def _reference_numbering(spark, df, cfg, num_shards, seed):
    """The numbering rule, computed in Python from each row's content hash: groups in sorted
    order, rows within a group by (hash, features, label); split first, then shards per split."""
    from sparkml_dist.data.sharding import group_offsets, validation_quota
    from sparkml_dist.spark.prepare import assemble

    a = assemble(spark, df, cfg)
    h = F.xxhash64(F.lit(seed), F.col(FEATURES), F.col(LABEL))
    rows = (a.frame.select(FEATURES, LABEL, h.alias("h"))
            .withColumn("b1", F.pmod(F.xxhash64(F.lit(seed), "h"), F.lit(cfg.random_buckets)))
            .withColumn("b2", F.pmod(F.xxhash64(F.lit(seed + 1), "h"), F.lit(cfg.random_buckets)))
            .collect())
    rows = [(tuple(r[FEATURES]), r[LABEL], r["h"], r["b1"], r["b2"]) for r in rows]

    def number(subset, key):
        groups = {}
        for r in subset:
            groups.setdefault(key(r), []).append(r)
        offsets = group_offsets({g: len(v) for g, v in groups.items()})
        out = []
        for g, members in groups.items():
            members.sort(key=lambda r: (r[2], r[0], r[1]))
            out += [(r, offsets[g] + pos, pos, g) for pos, r in enumerate(members)]
        return out

    split_key = (lambda r: r[1]) if cfg.split == "stratified" else (lambda r: r[3])
    shard_key = (lambda r: r[1]) if cfg.sharding == "stratified" else (lambda r: r[4])
    val = []
    train = list(rows)
    if cfg.val_fraction > 0:
        numbered = number(rows, split_key)
        sizes = {}
        for _, _, _, g in numbered:
            sizes[g] = sizes.get(g, 0) + 1
        quota = {g: validation_quota(c, cfg.val_fraction) for g, c in sizes.items()}
        val_n = validation_quota(len(rows), cfg.val_fraction)
        is_val = ((lambda row, pos, g: pos < quota[g]) if cfg.split == "stratified"
                  else (lambda row, pos, g: row < val_n))
        val = [r for r, row, pos, g in numbered if is_val(row, pos, g)]
        train = [r for r, row, pos, g in numbered if not is_val(row, pos, g)]
    out = []
    for split, subset in ((0, train), (1, val)):
        out += [(r[0], r[1], row, row % num_shards, split)
                for r, row, _, _ in number(subset, shard_key)]
    return sorted(out)


@pytest.mark.parametrize("split, sharding, val_fraction", [
    ("stratified", "stratified", 0.2), ("stratified", "stratified", 0.0),
    ("random", "random", 0.25), ("stratified", "random", 0.2), ("random", "stratified", 0.2)])
def test_one_shard_per_rank_follows_the_numbering_rule_exactly(spark, imbalanced, split, sharding,
                                                               val_fraction):
    # Duplicated rows tie on the hash: their order among themselves cannot show.
    df = imbalanced.unionByName(imbalanced.limit(40))
    cfg = DataConfig(feature_cols=("x1", "x2"), label_col="y", val_fraction=val_fraction,
                     split=split, sharding=sharding, random_buckets=7)
    _assert_numbering_rule(spark, df, cfg)


@pytest.mark.parametrize("partitions", [1, 2])
def test_classes_sharing_a_numbering_partition_follow_the_rule(spark, imbalanced, monkeypatch,
                                                               partitions):
    # Past _MAX_CLASS_PARTITIONS classes, several share a partition of the numbering sort and a
    # row's position there is offset by the rows of the classes sorted before its own.
    import sparkml_dist.spark.prepare as prep

    monkeypatch.setattr(prep, "_MAX_CLASS_PARTITIONS", partitions)
    df = imbalanced.unionByName(imbalanced.limit(40))
    cfg = DataConfig(feature_cols=("x1", "x2"), label_col="y", val_fraction=0.2)
    _assert_numbering_rule(spark, df, cfg)


def _assert_numbering_rule(spark, df, cfg):
    """Rows, numbers, partitions and storage order of ``prepare`` (N ranks, seed 5) are those of
    the reference numbering."""
    prepared = prepare(spark, df, cfg, N, seed=5)
    got = prepared.frame.select(F.spark_partition_id().alias("p"), FEATURES, LABEL, ROW, SHARD,
                                SPLIT).collect()
    assert sorted((tuple(r[FEATURES]), r[LABEL], r[ROW], r[SHARD], r[SPLIT]) for r in got) == \
        _reference_numbering(spark, df, cfg, N, 5)
    assert all(r["p"] == r[SHARD] for r in got)
    for p in range(N):  # a rank's shard store holds its partition's rows in row order
        _assert_stores_in_row_order([r for r in got if r["p"] == p], (p,))
    prepared.release()


def _assert_stores_in_row_order(rows, shards):
    """Feed one partition's rows, as they came, to a ShardBuilder: each (shard, split) store
    holds exactly those rows, ascending, with their own features and labels."""
    from sparkml_dist.data.shard_store import ShardBuilder

    width = len(rows[0][FEATURES])
    batch = pa.RecordBatch.from_arrays(
        [pa.array([list(r[FEATURES]) for r in rows], type=pa.list_(pa.float32())),
         pa.array([r[LABEL] for r in rows], pa.int64()), pa.array([r[ROW] for r in rows]),
         pa.array([r[SHARD] for r in rows], pa.int32()), pa.array([r[SPLIT] for r in rows],
                                                                  pa.int8())],
        names=[FEATURES, LABEL, ROW, SHARD, SPLIT])
    stores = ShardBuilder(width, 1 << 30, expected_shards=shards).extend([batch]).finish_shards()
    for shard in shards:
        for split, store in enumerate(stores[shard]):
            mine = sorted((r[ROW], tuple(r[FEATURES]), r[LABEL]) for r in rows
                          if r[SHARD] == shard and r[SPLIT] == split)
            np.testing.assert_array_equal(store.row_ids(), [m[0] for m in mine])
            if mine:
                x, y = store.gather(np.arange(len(store)))
                np.testing.assert_array_equal(x.numpy(), np.float32([m[1] for m in mine]))
                np.testing.assert_array_equal(y.numpy(), [m[2] for m in mine])


def test_a_layout_with_several_shards_per_rank(spark, imbalanced):
    from sparkml_dist.data.layout import DataLayout

    cfg = DataConfig(feature_cols=("x1", "x2"), label_col="y", val_fraction=0.2)
    layout = DataLayout(5, ((1, 3), (), (0, 2, 4)))
    many = _prepare(spark, imbalanced, cfg, layout, seed=5)
    flat = prepare(spark, imbalanced, cfg, 5, seed=5)  # the same 5 shards, one per rank
    assert many.num_workers == 3 and many.layout == layout
    assert many.frame.rdd.getNumPartitions() == 3
    assert many.train_shard_sizes == flat.train_shard_sizes and len(many.train_shard_sizes) == 5
    assert many.val_shard_sizes == flat.val_shard_sizes
    cols = [F.spark_partition_id().alias("p"), FEATURES, LABEL, ROW, SHARD, SPLIT]
    got = many.frame.select(*cols).collect()
    for r in got:
        assert r["p"] == layout.rank_of_shard(r[SHARD])
    for p in range(3):  # each rank's stores hold its shards' rows in row order
        mine = [r for r in got if r["p"] == p]
        if layout.shards_of_rank[p]:
            _assert_stores_in_row_order(mine, layout.shards_of_rank[p])
        else:
            assert not mine
    def key(rows):
        return sorted((tuple(r[FEATURES]), r[LABEL], r[ROW], r[SHARD], r[SPLIT]) for r in rows)

    assert key(got) == key(flat.frame.collect())
    many.release()
    flat.release()


def test_assemble_counts_classes_keeps_columns_and_examples_are_real_rows(spark, imbalanced):
    from sparkml_dist.spark.prepare import assemble

    cfg = DataConfig(feature_cols=("x1", "x2"), label_col="y")
    a = assemble(spark, imbalanced, cfg, keep=("y",))
    assert a.classes == ("a", "b", "c") and a.rows == 620 and a.dropped_rows == 0
    assert a.class_counts == {"a": 500, "b": 97, "c": 23}
    assert a.in_features == 2 and a.num_outputs == 3
    assert a.frame.columns == [FEATURES, LABEL, "y"]
    rows = a.frame.collect()
    assert all(a.classes[r[LABEL]] == r["y"] for r in rows)
    prepared = _prepare(spark, imbalanced, cfg, DataLayout.one_per_rank(2), seed=0)
    source = {tuple(np.float32(v) for v in (r["x1"], r["x2"])) for r in imbalanced.collect()}
    ex = prepared.example_features  # the logged model's input example: real rows
    assert ex.shape == (5, 2) and ex.dtype == np.float32
    assert all(tuple(e) in source for e in ex)
    # ... the first training rows by row number, so every run (and relaunch) logs the same ones
    first = sorted(prepared.frame.where(F.col(SPLIT) == 0).where(F.col(ROW) < 5)
                   .select(ROW, FEATURES).collect())
    assert [r[ROW] for r in first] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ex, np.asarray([r[FEATURES] for r in first], np.float32))
    prepared.release()
    with pytest.raises(DataError, match=r"column 'zz' to keep not found"):
        assemble(spark, imbalanced, cfg, keep=("zz",))


def test_lookup_maps_give_the_literal_maps_values_and_types(spark):
    """Integer maps are one SQL ``map(...)`` expression; other keys a literal at a time. Both
    return what ``create_map`` of literals returns, BIGINT values and missing keys included."""
    from sparkml_dist.spark.prepare import _lookup

    ints = {i: i * 7919 for i in range(300)} | {300: 1 << 40, 301: -5}
    strings = {"a": 1, "b": 1 << 35}
    df = spark.range(0, 305).select(F.col("id").cast("int").alias("k"),
                                    F.when(F.col("id") % 2 == 0, "a").otherwise("b").alias("s"))

    def literal_map(mapping, key):
        return F.create_map(*[x for k, v in mapping.items() for x in (F.lit(k), F.lit(v))])[key]

    out = df.select(_lookup(ints, F.col("k")).alias("fast"),
                    literal_map(ints, F.col("k")).alias("ref"),
                    _lookup(strings, F.col("s")).alias("s_fast"),
                    literal_map(strings, F.col("s")).alias("s_ref"))
    assert out.schema["fast"].dataType == out.schema["ref"].dataType
    rows = out.collect()
    assert [(r.fast, r.s_fast) for r in rows] == [(r.ref, r.s_ref) for r in rows]
    assert rows[300].fast == 1 << 40 and rows[301].fast == -5 and rows[304].fast is None
    assert rows[1].s_fast == 1 << 35


def test_a_rank_refuses_a_shard_whose_size_differs_from_the_dealt_one():
    """The driver deals shard sizes without counting the stored rows; each rank checks what it
    received, training and validation apart, before it trains on it."""
    from sparkml_dist.spark.task import check_shard_sizes
    from sparkml_dist.training.loop import RankPlan

    plan = RankPlan(in_features=2, num_outputs=2, train_shard_sizes=(5, 4),
                    val_shard_sizes=(2, 1))
    check_shard_sizes(plan, (1,), 4, 1)  # what was dealt: nothing to say
    with pytest.raises(RuntimeError, match=r"shard 1 received 3 training rows but 4 were dealt"):
        check_shard_sizes(plan, (1,), 3, 1)
    with pytest.raises(RuntimeError, match=r"shard 0 received 1 validation rows but 2 were dealt"):
        check_shard_sizes(plan, (0,), 5, 1)
    unplanned = RankPlan(in_features=2, num_outputs=2, train_shard_sizes=(5, 4))
    check_shard_sizes(unplanned, (0,), 5, 7)  # validation sizes not dealt: not checked
    check_shard_sizes(plan, (), 0, 0)  # a rank fed by its peers reads no shard
