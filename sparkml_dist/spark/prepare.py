"""Driver-side data preparation: read, validate, split and shard, with DataFrame APIs only.

Every step is a DataFrame operation (no ``SparkContext``/RDD), so it also runs through Spark
Connect. Row numbering is a deterministic function of the rows' content and the seed (an
``xxhash64`` ordering), so a relaunched attempt recomputes exactly the same shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkml_dist.config import DataConfig
from sparkml_dist.data.sharding import group_offsets, validation_quota
from sparkml_dist.data.shard_store import FEATURES, LABEL, ROW, SHARD, SPLIT
from sparkml_dist.errors import DataError

log = logging.getLogger(__name__)

_HASH = "__h"
_GROUP = "__group"
_POS = "__pos"
_KEY = "__key"
_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType,
            T.DecimalType)


@dataclass(frozen=True)
class PreparedData:
    """The sharded DataFrame plus what ranks and the driver need to know about it."""

    frame: DataFrame
    """Rows with ``__features``, ``__label``, ``__row``, ``__shard``, ``__split``; partition r
    holds exactly shard r."""
    num_workers: int
    in_features: int
    classes: tuple[Any, ...]
    """Sorted distinct labels (classification); label index i means ``classes[i]``."""
    train_shard_sizes: tuple[int, ...]
    val_shard_sizes: tuple[int, ...]
    dropped_rows: int
    train_class_counts: dict[Any, int]
    val_class_counts: dict[Any, int]

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.classes else 1


def read_source(spark: SparkSession, cfg: DataConfig) -> DataFrame:
    """Read ``data.source`` as a table or a Parquet/CSV/JSON/ORC path."""
    if not cfg.source:
        raise DataError("no data: pass a DataFrame to fit() or set data.source to a table name "
                        "or a Parquet/CSV/JSON/ORC path.")
    fmt = cfg.format
    if fmt is None:
        suffix = cfg.source.rstrip("/").rsplit(".", 1)[-1].lower()
        fmt = suffix if suffix in ("parquet", "csv", "json", "orc") else None
        if fmt is None and "/" not in cfg.source:
            fmt = "table"
    if fmt is None:
        raise DataError(f"cannot tell the format of data.source={cfg.source!r}; set data.format "
                        "to one of parquet, csv, json, orc, table.")
    if fmt == "table":
        return spark.table(cfg.source)
    reader = spark.read.options(**dict(cfg.read_options))
    if fmt == "csv" and "header" not in cfg.read_options:
        reader = reader.option("header", "true").option("inferSchema", "true")
    return reader.format(fmt).load(cfg.source)


def _feature_columns(df: DataFrame, cfg: DataConfig) -> list[Column]:
    """Feature expressions, each an ``array<float>``, in configured order."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    wanted = list(cfg.feature_cols) + ([cfg.features_col] if cfg.features_col else [])
    if not wanted:
        raise DataError("no features configured: set data.feature_cols (numeric columns) and/or "
                        f"data.features_col (an array or vector column); columns are: "
                        f"{', '.join(fields)}.")
    missing = [c for c in wanted + [cfg.label_col] if c not in fields]
    if missing:
        key = "data.label_col" if missing[0] == cfg.label_col else "data.feature_cols/features_col"
        raise DataError(f"column {missing[0]!r} not found; columns are: {', '.join(fields)}. "
                        f"Set {key}.")
    exprs: list[Column] = []
    for name in cfg.feature_cols:
        if not isinstance(fields[name], _NUMERIC):
            raise DataError(f"feature column {name!r} has type {fields[name].simpleString()}; "
                            "features must be numeric. Cast it, or drop it from data.feature_cols.")
        exprs.append(F.array(F.col(name).cast("float")))
    if cfg.features_col:
        dtype = fields[cfg.features_col]
        col = F.col(cfg.features_col)
        if dtype.typeName() == "vector" or type(dtype).__name__ == "VectorUDT":
            from pyspark.ml.functions import vector_to_array

            exprs.append(vector_to_array(col, "float32"))
        elif isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, _NUMERIC):
            exprs.append(col.cast(T.ArrayType(T.FloatType())))
        else:
            raise DataError(f"data.features_col {cfg.features_col!r} has type "
                            f"{dtype.simpleString()}; expected an array of numbers or an ML "
                            "vector.")
    return exprs


def _invalid_flags(df: DataFrame, cfg: DataConfig, label_numeric: bool) -> dict[str, Column]:
    """One boolean column per source column: is this row's value null or NaN?"""
    flags: dict[str, Column] = {}
    for name in cfg.feature_cols:
        c = F.col(name)
        flags[name] = c.isNull() | F.isnan(c.cast("double"))
    if cfg.features_col:
        c = F.col(FEATURES)
        flags[cfg.features_col] = c.isNull() | F.exists(c, lambda x: x.isNull() | F.isnan(x))
    lab = F.col(cfg.label_col)
    flags[cfg.label_col] = lab.isNull() | (F.isnan(lab.cast("double")) if label_numeric
                                           else F.lit(False))
    return flags


def _hash_aligned_keys(spark: SparkSession, num_workers: int) -> list[int]:
    """Integer keys k_r with ``pmod(hash(k_r), n) == r``: ``repartition(n, key)`` puts key k_r in
    partition r, because Spark's hash partitioning uses the same Murmur3 hash."""
    found: dict[int, int] = {}
    span = 64 * num_workers
    start = 0
    while len(found) < num_workers:
        rows = (spark.range(start, start + span)
                .select(F.col("id").cast("int").alias("k"))
                .select("k", F.expr(f"pmod(hash(k), {num_workers})").alias("p"))
                .groupBy("p").agg(F.min("k").alias("k")).collect())
        for r in rows:
            found.setdefault(int(r["p"]), int(r["k"]))
        start += span
        assert start < 10_000_000, "could not find hash-aligned partition keys"
    return [found[r] for r in range(num_workers)]


def _number_rows(df: DataFrame, group: Column) -> tuple[DataFrame, dict[Any, int]]:
    """Give each row a global number ``__row``: groups laid out in sorted order, rows within a
    group in content-hash order. Returns the frame and the row count of each group."""
    from pyspark.sql.window import Window

    df = df.withColumn(_GROUP, group)
    counts = {r[_GROUP]: int(r["count"]) for r in df.groupBy(_GROUP).count().collect()}
    if not counts:  # an empty subset (e.g. no validation rows)
        return df.withColumn(_POS, F.lit(0)).withColumn(ROW, F.lit(0).cast("long")), counts
    offsets = group_offsets(counts)
    w = Window.partitionBy(_GROUP).orderBy(_HASH, FEATURES, LABEL)
    offset_map = F.create_map(*[x for k, v in offsets.items() for x in (F.lit(k), F.lit(v))])
    numbered = (df.withColumn(_POS, F.row_number().over(w) - 1)
                .withColumn(ROW, offset_map[F.col(_GROUP)] + F.col(_POS)))
    return numbered, counts


def prepare(spark: SparkSession, df: DataFrame, cfg: DataConfig, num_workers: int,
            seed: int) -> PreparedData:
    """Validate ``df`` and lay it out as ``num_workers`` train+validation shards."""
    exprs = _feature_columns(df, cfg)
    label_type = df.schema[cfg.label_col].dataType
    label_numeric = isinstance(label_type, _NUMERIC)
    if cfg.task == "regression" and not label_numeric:
        raise DataError(f"label column {cfg.label_col!r} has type {label_type.simpleString()}; "
                        "regression needs a numeric label. Set data.task=classification?")
    base = df.select(*[F.col(c) for c in dict.fromkeys(list(cfg.feature_cols) + [cfg.label_col])],
                     *([F.col(cfg.features_col)] if cfg.features_col else []))
    base = base.withColumn(FEATURES, F.flatten(F.array(*exprs)) if len(exprs) > 1 else exprs[0])
    flags = _invalid_flags(base, cfg, label_numeric)
    any_bad = F.lit(False)
    for f in flags.values():
        any_bad = any_bad | f
    stats = base.agg(
        F.count(F.lit(1)).alias("n"),
        F.min(F.size(FEATURES)).alias("wmin"), F.max(F.size(FEATURES)).alias("wmax"),
        F.sum(any_bad.cast("long")).alias("bad"),
        *[F.sum(f.cast("long")).alias(f"bad_{i}") for i, f in enumerate(flags.values())],
    ).collect()[0]
    n, bad = int(stats["n"]), int(stats["bad"] or 0)
    if n == 0:
        raise DataError("the dataset is empty (0 rows); check data.source and any filters.")
    dropped = 0
    if bad:
        per_col = {name: int(stats[f"bad_{i}"] or 0) for i, name in enumerate(flags)}
        detail = ", ".join(f"{k}: {v}" for k, v in per_col.items() if v)
        if cfg.on_invalid == "error":
            raise DataError(f"{bad} of {n} rows have null or NaN values ({detail}). Clean the data "
                            "or set data.on_invalid=drop to drop those rows.")
        base = base.where(~any_bad)
        dropped, n = bad, n - bad
        log.warning("dropped %d rows with null or NaN values (%s); %d rows remain",
                    dropped, detail, n)
        if n == 0:
            raise DataError("every row had a null or NaN value; nothing is left to train on.")
        stats = base.agg(F.min(F.size(FEATURES)).alias("wmin"),
                         F.max(F.size(FEATURES)).alias("wmax")).collect()[0]
    wmin, wmax = int(stats["wmin"]), int(stats["wmax"])
    if wmin != wmax or wmin == 0:
        raise DataError(f"feature rows must all have the same width; widths range from {wmin} to "
                        f"{wmax}. Pad or filter the rows of data.features_col.")
    base = base.withColumn(LABEL, F.col(cfg.label_col))

    classes: tuple[Any, ...] = ()
    if cfg.task == "classification":
        classes = tuple(sorted((r[0] for r in base.select(LABEL).distinct().collect()),
                               key=lambda v: (str(type(v)), v)))
        if len(classes) < 2:
            raise DataError(f"label column {cfg.label_col!r} has a single class {classes!r}; "
                            "classification (and stratified split/sharding) needs at least 2.")
        index = F.create_map(*[x for i, c in enumerate(classes) for x in (F.lit(c), F.lit(i))])
        base = base.withColumn(LABEL, index[F.col(LABEL)].cast("long"))
    else:
        base = base.withColumn(LABEL, F.col(LABEL).cast("float"))
    base = base.select(FEATURES, LABEL).withColumn(
        _HASH, F.xxhash64(F.lit(seed), F.col(FEATURES), F.col(LABEL)))

    val_n = 0
    if cfg.val_fraction > 0:
        split_group = _group_col(cfg.split, cfg.random_buckets, seed)
        numbered, counts = _number_rows(base, split_group)
        if cfg.split == "stratified":
            quota = {k: validation_quota(v, cfg.val_fraction) for k, v in counts.items()}
            qmap = F.create_map(*[x for k, v in quota.items() for x in (F.lit(k), F.lit(v))])
            is_val = F.col(_POS) < qmap[F.col(_GROUP)]
            val_n = sum(quota.values())
        else:
            val_n = validation_quota(n, cfg.val_fraction)
            is_val = F.col(ROW) < val_n
        base = numbered.withColumn(SPLIT, is_val.cast("byte")).select(FEATURES, LABEL, _HASH, SPLIT)
    else:
        base = base.withColumn(SPLIT, F.lit(0).cast("byte"))
    train_n = n - val_n
    if train_n < num_workers:
        raise DataError(f"{train_n} training rows for training.num_workers={num_workers}: every "
                        "worker needs at least one row. Lower training.num_workers or "
                        "data.val_fraction, or add data.")

    parts = []
    class_counts: list[dict[Any, int]] = []
    for split in (0, 1):
        subset = base.where(F.col(SPLIT) == split)
        shard_group = _group_col(cfg.sharding, cfg.random_buckets, seed + 1)
        numbered, counts = _number_rows(subset, shard_group)
        label_counts = ({classes[int(k)]: v for k, v in counts.items()}
                        if cfg.sharding == "stratified" else {})
        class_counts.append(label_counts)
        parts.append(numbered.withColumn(SHARD, (F.col(ROW) % num_workers).cast("int")))
    keys = _hash_aligned_keys(spark, num_workers)
    key_map = F.create_map(*[x for r, k in enumerate(keys) for x in (F.lit(r), F.lit(k))])
    frame = (parts[0].unionByName(parts[1])
             .select(FEATURES, LABEL, F.col(ROW).cast("long").alias(ROW), SHARD, SPLIT)
             .withColumn(_KEY, key_map[F.col(SHARD)])
             .repartition(num_workers, F.col(_KEY))
             .sortWithinPartitions(SPLIT, ROW)
             .drop(_KEY))

    def sizes(total: int) -> tuple[int, ...]:
        return tuple(total // num_workers + (1 if r < total % num_workers else 0)
                     for r in range(num_workers))

    log.info("prepared %d rows (%d train, %d validation, %d dropped) of width %d into %d shards",
             n, train_n, val_n, dropped, wmin, num_workers)
    return PreparedData(frame=frame, num_workers=num_workers, in_features=wmin, classes=classes,
                        train_shard_sizes=sizes(train_n), val_shard_sizes=sizes(val_n),
                        dropped_rows=dropped, train_class_counts=class_counts[0],
                        val_class_counts=class_counts[1])


def _group_col(mode: str, buckets: int, seed: int) -> Column:
    """Grouping for numbering: the class (stratified) or a hash bucket (random)."""
    if mode == "stratified":
        return F.col(LABEL)
    return F.pmod(F.xxhash64(F.lit(seed), F.col(_HASH)), F.lit(buckets))
