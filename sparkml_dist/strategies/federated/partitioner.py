"""Give a DataFrame a client column for experiments: label-skewed Dirichlet(alpha) clients or
IID (content-hash) clients. DataFrame APIs only, so it also works through Spark Connect; the
assignment is a pure function of the rows' content and the seed."""

from __future__ import annotations

from typing import Any

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from sparkml_dist.errors import DataError
from sparkml_dist.strategies.federated.dirichlet import dirichlet_counts

_POS = "__fed_pos"


def _row_hash(df: DataFrame, seed: int) -> Column:
    return F.xxhash64(F.lit(seed), *[F.col(c) for c in df.columns])


def iid_clients(df: DataFrame, num_clients: int, seed: int = 0,
                client_col: str = "client") -> DataFrame:
    """Add ``client_col`` (0..num_clients-1) by a content hash: clients of near-equal size with
    the dataset's label mix."""
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1; got {num_clients}")
    return df.withColumn(client_col, F.pmod(_row_hash(df, seed), F.lit(num_clients)).cast("int"))


def dirichlet_clients(df: DataFrame, label_col: str, num_clients: int, alpha: float,
                      seed: int = 0, client_col: str = "client",
                      min_rows: int = 1) -> DataFrame:
    """Add ``client_col`` (0..num_clients-1) so that each class's rows are split over clients in
    Dirichlet(alpha) proportions (see :mod:`.dirichlet`); every client gets >= ``min_rows``."""
    if label_col not in df.columns:
        raise DataError(f"label column {label_col!r} not found; columns are: "
                        f"{', '.join(df.columns)}.")
    counts = {r[0]: int(r[1]) for r in df.groupBy(label_col).count().collect()}
    if None in counts:
        raise DataError(f"label column {label_col!r} has {counts[None]} null values; drop them "
                        "before splitting into clients.")
    classes: list[Any] = sorted(counts, key=lambda v: (str(type(v)), v))
    matrix = dirichlet_counts([counts[c] for c in classes], num_clients, alpha,
                              np.random.default_rng([seed, 0xD1]), min_rows)
    # Client j of class c takes class positions [cum[j-1], cum[j]); the client index is the
    # number of boundaries at or below a row's position.
    bounds = F.create_map(*[x for c, row in zip(classes, matrix)
                            for x in (F.lit(c), F.array(*[F.lit(int(b)) for b in np.cumsum(row)]))])
    w = Window.partitionBy(label_col).orderBy(_row_hash(df, seed))
    pos = F.col(_POS)
    return (df.withColumn(_POS, F.row_number().over(w) - 1)
            .withColumn(client_col,
                        F.size(F.filter(bounds[F.col(label_col)], lambda b: b <= pos)).cast("int"))
            .drop(_POS))
