"""``data.scale`` and ``data.on_invalid=fill``: fit the feature scaling and the missing-value
fill on the training split with Spark and apply them to the prepared rows before launch (see
:mod:`sparkml_dist.preprocessing` for the transforms). The fill comes first, then the scaling is
fitted on the filled rows.

Runs after :func:`~sparkml_dist.spark.prepare.split_and_shard`, on its persisted frame, so the
row numbering, split and shards are exactly those of an unscaled job; only ``__features``
changes. DataFrame operations only (works through Spark Connect).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkml_dist.data.shard_store import FEATURES, SPLIT
from sparkml_dist.errors import DataError
from sparkml_dist.preprocessing import FeatureScaling, FillKind, MissingFill, OneHotEncoding, \
    ScaleKind
from sparkml_dist.spark.prepare import PreparedData, _persist

log = logging.getLogger(__name__)


def fit_scaling(prepared: PreparedData, kind: ScaleKind) -> FeatureScaling:
    """Per-feature mean, population standard deviation, min and max over the TRAINING rows
    (``__split = 0``) in one aggregation; validation rows never inform the scaling."""
    exploded = (prepared.frame.filter(F.col(SPLIT) == 0)
                .select(F.posexplode(FEATURES).alias("i", "v")))
    rows = (exploded.groupBy("i")
            .agg(F.count("v").alias("n"), F.mean("v").alias("mean"),
                 F.stddev_pop("v").alias("std"), F.min("v").alias("lo"), F.max("v").alias("hi"))
            .collect())
    width = prepared.in_features
    if len(rows) != width:
        raise DataError(f"data.scale={kind}: the training split has values for {len(rows)} of "
                        f"{width} features; it needs at least one training row.")
    stats = np.zeros((4, width))
    for r in rows:
        stats[:, r["i"]] = [r["mean"], r["std"], r["lo"], r["hi"]]
    scaling = FeatureScaling.from_stats(kind, *stats, train_rows=int(rows[0]["n"]))
    log.info("data.scale=%s fitted on %d training rows, %d features", kind, scaling.train_rows,
             width)
    return scaling


def _train_values(prepared: PreparedData) -> DataFrame:
    """``(i, v)``: every training row's feature ``i`` with value ``v``."""
    return (prepared.frame.filter(F.col(SPLIT) == 0)
            .select(F.posexplode(FEATURES).alias("i", "v")))


def fit_fill(prepared: PreparedData, kind: FillKind) -> MissingFill:
    """Per-feature mean and median (``percentile_approx``) of the non-missing TRAINING values
    and the count of missing ones, in one aggregation."""
    gone = F.col("v").isNull() | F.isnan("v")  # a null stays null in the prepared rows
    present = F.when(~gone, F.col("v"))
    rows = (_train_values(prepared).groupBy("i")
            .agg(F.count(F.lit(1)).alias("n"), F.mean(present).alias("mean"),
                 F.percentile_approx(present, 0.5).alias("median"),
                 F.sum(gone.cast("long")).alias("missing"))
            .collect())
    width = prepared.in_features
    stats = np.full((3, width), np.nan)
    for r in rows:
        stats[:, r["i"]] = [np.nan if r["mean"] is None else r["mean"],
                            np.nan if r["median"] is None else r["median"], r["missing"]]
    empty = [i for i in range(width) if not np.isfinite(stats[0, i])]
    if empty:
        log.warning("features %s have no value in the training split; they are filled with 0",
                    empty)
    fill = MissingFill.from_stats(kind, stats[0], stats[1], np.nan_to_num(stats[2]),
                                  train_rows=int(rows[0]["n"]) if rows else 0)
    log.info("data.on_invalid=fill (%s): %d missing training values over %d features", kind,
             sum(fill.missing), width)
    return fill


def fill_prepared(prepared: PreparedData, fill: MissingFill) -> PreparedData:
    """``prepared`` with NaN features replaced by the fill values (float32, a selection: the
    same values as :class:`~sparkml_dist.preprocessing.FilledModel`), persisted."""
    values = F.array(*[F.lit(float(v)).cast("float") for v in fill.array()])
    frame = prepared.frame.withColumn(FEATURES, F.transform(
        FEATURES, lambda x, i: F.when(F.isnan(x) | x.isNull(), F.element_at(values, i + 1)).otherwise(x)))
    return _replaced(prepared, frame)


def fit_one_hot(prepared: PreparedData, numeric_cols: tuple[str, ...]) -> OneHotEncoding:
    """Each categorical column's vocabulary: its distinct values in the TRAINING rows (sorted);
    values only in validation rows are unknown to the model, as at scoring time."""
    k = prepared.in_features - len(prepared.categories)
    rows = (_train_values(prepared).where((F.col("i") >= k) & (F.col("v") >= 0))
            .select("i", "v").distinct().collect())
    seen: dict[int, set[int]] = {}
    for r in rows:
        seen.setdefault(int(r["i"]) - k, set()).add(int(r["v"]))
    categorical = tuple((name, tuple(values[g] for g in sorted(seen.get(j, ()))))
                        for j, (name, values) in enumerate(prepared.categories))
    for name, vocab in categorical:
        log.info("data.categorical_cols: %r one-hot encoded as %d categories", name, len(vocab))
    return OneHotEncoding(numeric_cols=tuple(numeric_cols), categorical=categorical)


def one_hot_prepared(prepared: PreparedData, encoding: OneHotEncoding) -> PreparedData:
    """``prepared`` with each categorical index expanded into 0/1 features of the training
    vocabulary (all zeros for a null or validation-only value), persisted; the example rows
    are recoded to the vocabulary indices the logged model takes."""
    k = len(encoding.numeric_cols)
    parts = [F.slice(FEATURES, 1, k)] if k else []
    remap = []
    for j, ((name, vocab), (_, values)) in enumerate(zip(encoding.categorical,
                                                          prepared.categories)):
        index = {v: float(i) for i, v in enumerate(values)}
        code = F.element_at(FEATURES, k + j + 1)
        if vocab:
            parts.append(F.array(*[(code == F.lit(index[v]).cast("float")).cast("float")
                                   for v in vocab]))
        local = {index[v]: i for i, v in enumerate(vocab)}
        remap.append(lambda g, local=local: float(local.get(float(g), -1)))
    frame = prepared.frame.withColumn(FEATURES, F.concat(*parts))
    example = np.asarray(prepared.example_features, dtype=np.float32).copy()
    for j, fn in enumerate(remap):
        example[:, k + j] = [fn(g) for g in example[:, k + j]]
    out = _replaced(prepared, frame)
    return dataclasses.replace(out, in_features=encoding.width, example_features=example,
                               categories=())


def _replaced(prepared: PreparedData, frame: DataFrame) -> PreparedData:
    frame = _persist(frame)
    return dataclasses.replace(prepared, frame=frame,
                               persisted=tuple(prepared.persisted) + (frame,))


def scale_prepared(prepared: PreparedData, scaling: FeatureScaling) -> PreparedData:
    """``prepared`` with ``__features`` replaced by ``(x - shift) * scale`` in float32 (the same
    two float operations as :class:`~sparkml_dist.preprocessing.ScaledModel`), persisted; the
    example rows stay raw (the logged model takes raw rows)."""
    shift, scale = scaling.arrays()
    shift_col = F.array(*[F.lit(float(v)).cast("float") for v in shift])
    scale_col = F.array(*[F.lit(float(v)).cast("float") for v in scale])
    frame = prepared.frame.withColumn(FEATURES, F.transform(
        FEATURES, lambda x, i: (x - F.element_at(shift_col, i + 1))
        * F.element_at(scale_col, i + 1)))
    return _replaced(prepared, frame)
