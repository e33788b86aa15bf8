"""Scoring throughput: ``sparkml_dist.inference.predict_udf`` against ``mlflow.pyfunc.spark_udf``
on the same MLflow model and the same cached DataFrame.

    python benchmarks/bench_inference.py [--rows 200000 --reps 5 --batch-size 1024]

The data is scikit-learn's digits repeated to ``--rows`` rows (``array<float>`` of 64), split
into 4 partitions and cached in memory before the clock runs. The model is the demo's MLP
(64 -> 128 -> 64 -> 10, untrained: throughput does not depend on the weights), logged through
``JobRun.log_model`` exactly as ``fit`` logs it (MLflow's default ``pt2`` format).

Each round scores every row once with each UDF, alternately, into Spark's ``noop`` sink, so
nothing is collected to the driver:
- ``ours``: ``predict_udf(model_uri)("features")``: the decoded label and the softmax
  probabilities (a struct), Arrow in and out.
- ``pyfunc``: ``mlflow.pyfunc.spark_udf(spark, model_uri, result_type="array<float>",
  env_manager="local")("features")``: the raw logits (less work: no softmax, no decoding).
- ``floor``: an Arrow UDF over the same column that returns nulls without looking at it: what
  moving the column to Python and back costs any Python UDF here (no model at all).

rows/s = rows / wall time of the ``noop`` write. One untimed warm-up round each first starts the
Python workers and loads the model there (both UDFs cache it per worker). Reported: medians over
``--reps`` rounds and the median of the per-round ratios ours/pyfunc.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from common import median, paired_ratios, setup_env, spark_session, summary, write_result

setup_env()


def log_demo_model(tracking_uri: str) -> str:
    """The demo MLP logged like ``fit`` logs it; returns its ``models:/m-...`` URI."""
    from sparkml_dist.config import JobConfig
    from sparkml_dist.datasets import digits_table
    from sparkml_dist.models import mlp
    from sparkml_dist.tracking.run import JobRun

    cfg = JobConfig().replace(**{"tracking.tracking_uri": tracking_uri,
                                 "tracking.experiment": "bench-inference"})
    run = JobRun(cfg)
    example = np.asarray(digits_table().column("features").to_pylist()[:5], dtype=np.float32)
    uri = run.log_model(mlp(64, 10, hidden=(128, 64)), example, tuple(range(10)), None)
    run.finish()
    return uri


def floor_udf():
    """An Arrow UDF that ignores its input: the cost of the round trip to Python alone."""
    from pyspark.sql.functions import arrow_udf
    from pyspark.sql.types import LongType

    def nothing(batches: Iterator[pa.Array]) -> Iterator[pa.Array]:
        for batch in batches:
            yield pa.nulls(len(batch), pa.int64())

    return arrow_udf(nothing, LongType())


def timed_noop(df, column) -> float:
    t0 = time.perf_counter()
    df.select(column.alias("p")).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()

    import mlflow
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    from sparkml_dist.datasets import digits_table
    from sparkml_dist.inference import predict_udf

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        tracking_uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        model_uri = log_demo_model(tracking_uri)
        spark = spark_session("bench-inference")
        table = digits_table()
        copies = -(-args.rows // table.num_rows)
        path = Path(tmp) / "digits.parquet"
        pq.write_table(pa.concat_tables([table] * copies).slice(0, args.rows), path)
        df = spark.read.parquet(str(path)).repartition(4).cache()
        rows = df.count()

        ours = predict_udf(model_uri, tracking_uri=tracking_uri, batch_size=args.batch_size)
        mlflow.set_tracking_uri(tracking_uri)
        pyfunc = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="array<float>",
                                         env_manager="local")
        columns = {"ours": ours(F.col("features")), "pyfunc": pyfunc(F.col("features")),
                   "floor": floor_udf()(F.col("features"))}
        for col in columns.values():  # warm-up: workers start, models load
            timed_noop(df, col)
        seconds: dict[str, list[float]] = {name: [] for name in columns}
        for rep in range(args.reps):  # rotate the order so no variant always goes first
            order = [*list(columns)[rep % 3:], *list(columns)[:rep % 3]]
            for name in order:
                seconds[name].append(timed_noop(df, columns[name]))
        spark.stop()

    rate = {name: [rows / s for s in secs] for name, secs in seconds.items()}
    record = {
        "rows": rows, "reps": args.reps, "batch_size": args.batch_size,
        "model": "mlp 64-128-64-10 (pt2)", "spark_master": "local[2]",
        **{f"{name}_rows_per_s": summary(r) for name, r in rate.items()},
        **{f"{name}_seconds": secs for name, secs in seconds.items()},
        "ratio_ours_over_pyfunc": paired_ratios(rate["ours"], rate["pyfunc"]),
        "ratio_ours_over_floor": paired_ratios(rate["ours"], rate["floor"]),
    }
    out = write_result("inference", record)
    print(f"ours   {median(rate['ours']):>12,.0f} rows/s")
    print(f"pyfunc {median(rate['pyfunc']):>12,.0f} rows/s")
    print(f"floor  {median(rate['floor']):>12,.0f} rows/s (no model)")
    print(f"ours/pyfunc {record['ratio_ours_over_pyfunc']['median']:.2f}x, ours/floor "
          f"{record['ratio_ours_over_floor']['median']:.2f}x -> {out}")


if __name__ == "__main__":
    main()
