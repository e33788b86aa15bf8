"""``data.scale``: fit the feature scaling on the training split with Spark and apply it to the
prepared rows before launch (see :mod:`sparkml_dist.preprocessing` for the transform).

Runs after :func:`~sparkml_dist.spark.prepare.split_and_shard`, on its persisted frame, so the
row numbering, split and shards are exactly those of an unscaled job; only ``__features``
changes. DataFrame operations only (works through Spark Connect).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from pyspark.sql import functions as F

from sparkml_dist.data.shard_store import FEATURES, SPLIT
from sparkml_dist.errors import DataError
from sparkml_dist.preprocessing import FeatureScaling, ScaleKind
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
    frame = _persist(frame)
    return dataclasses.replace(prepared, frame=frame,
                               persisted=tuple(prepared.persisted) + (frame,))
