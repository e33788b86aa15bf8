"""Data feed: Spark DataFrame -> barrier task -> ShardStore -> torch batches, against pyarrow
reading the same Parquet straight into tensors.

    python benchmarks/bench_feed.py [--rows 500000 --reps 5]

The data is ``--rows`` x 64 float32 features, an int64 label and an int64 row number, written as
two Parquet files (one per rank). Each round runs, in this order:
- ``spark_memory``: ``spark.read.parquet`` (two partitions, one file each) -> ``mapInArrow(barrier=
  True)``; in each task the library's ``ShardBuilder`` takes the Arrow batches and ``finish()``es a
  ``ShardStore``, then one full pass of ``gather()`` over a random permutation.
- ``spark_spilled``: the same with a 8 MiB memory budget, so the shard goes to a memory-mapped
  raw float32 file (one contiguous array).
- ``pyarrow``: two processes at once, each ``pq.read_table`` of its file, ``to_numpy`` and
  ``torch.from_numpy``, then the same gather pass with ``torch.index_select`` (plain ``x[idx]``
  advanced indexing is several times slower on CPU).
Both sides run torch with one thread (Spark sets OMP_NUM_THREADS=1 for a 1-cpu task).

Definitions (per rank, then the slower rank of the pair):
- rows/s = rank rows / (task start -> store finished + gather pass done). "Task start" is the
  entry of the task function after its imports (torch etc. already loaded), so JVM scheduling and
  Python worker start are outside; ``end_to_end_rows_per_s`` divides all rows by the driver's
  ``collect()`` (or ``Popen`` ... ``wait``) time and includes them (a fresh Python process per
  rank on both sides: Spark's worker reuse is off here).
- peak memory = RSS high-water mark (``getrusage``) after the pass, minus the RSS at task start
  (the high-water mark is reset there through ``/proc/self/clear_refs``), against the shard's
  Arrow size (features + labels + row numbers). For spilled shards, mapped file pages that the
  pass touched count as RSS (reclaimable page cache); ``rss_anon_delta`` excludes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from common import paired_ratios, setup_env, spark_session, summary, write_result

setup_env()
WIDTH = 64


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _memory_start() -> dict[str, int]:
    """Reset the RSS high-water mark to the current RSS; return the baseline."""
    import resource

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    return {"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "reset": reset,
            **_status_kib()}


def _memory_delta(start: dict[str, int]) -> dict[str, Any]:
    import resource

    now = _status_kib()
    return {"peak_rss_delta": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                               - start["maxrss_kib"]) * 1024,
            "rss_anon_delta": (now["RssAnon"] - start["RssAnon"]) * 1024,
            "rss_file_delta": (now["RssFile"] - start["RssFile"]) * 1024,
            "hwm_reset": start["reset"]}


def _gather_pass(gather, n: int, batch: int, seed: int) -> float:
    order = np.random.default_rng(seed).permutation(n)
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        gather(order[s:s + batch])
    return time.perf_counter() - t0


def feed_task(budget_bytes: int, gather_batch: int, batches: Iterator) -> Iterator:
    """``mapInArrow`` body: build this rank's ShardStore, then one gather pass."""
    import pyarrow as pa
    import torch  # noqa: F401 - loaded before the clock starts, as in a training task
    from pyspark import BarrierTaskContext

    from sparkml_dist.data.shard_store import ShardBuilder

    rank = BarrierTaskContext.get().partitionId()
    mem = _memory_start()
    t0 = time.perf_counter()
    train, _ = ShardBuilder(WIDTH, budget_bytes).extend(batches).finish()
    t_built = time.perf_counter() - t0
    t_gather = _gather_pass(train.gather, len(train), gather_batch, rank)
    out = {"rank": rank, "rows": len(train), "build_s": t_built, "gather_s": t_gather,
           "total_s": t_built + t_gather, "arrow_nbytes": train.arrow_nbytes,
           "chunks": len(train._chunks), "spilled": train.spilled_path is not None,
           **_memory_delta(mem)}
    yield pa.RecordBatch.from_pylist([{"r": json.dumps(out)}])


def pyarrow_worker(path: str, rank: int, gather_batch: int, out: str) -> None:
    """One baseline rank: Parquet -> numpy -> torch, then the same gather pass."""
    import pyarrow.parquet as pq
    import torch

    mem = _memory_start()
    t0 = time.perf_counter()
    table = pq.read_table(path)
    x = torch.from_numpy(table.column("features").combine_chunks().flatten().to_numpy()
                         .reshape(-1, WIDTH))
    y = torch.from_numpy(table.column("label").to_numpy())
    arrow_nbytes = x.numel() * 4 + y.numel() * 8 + table.column("row").nbytes
    t_built = time.perf_counter() - t0

    def gather(idx: np.ndarray):
        i = torch.from_numpy(idx)
        return torch.index_select(x, 0, i), torch.index_select(y, 0, i)

    t_gather = _gather_pass(gather, len(y), gather_batch, rank)
    res = {"rank": rank, "rows": len(y), "build_s": t_built, "gather_s": t_gather,
           "total_s": t_built + t_gather, "arrow_nbytes": arrow_nbytes, "chunks": 1,
           "spilled": False, **_memory_delta(mem)}
    Path(out).write_text(json.dumps(res))


def write_data(rows: int, tmp: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    half = rows // 2
    paths = []
    for r, (lo, hi) in enumerate([(0, half), (half, rows)]):
        x = rng.standard_normal((hi - lo) * WIDTH, dtype=np.float32)
        table = pa.table({
            "features": pa.FixedSizeListArray.from_arrays(pa.array(x), WIDTH).cast(
                pa.list_(pa.float32())),
            "label": pa.array(rng.integers(0, 10, hi - lo)),
            "row": pa.array(np.arange(lo, hi, dtype=np.int64))})
        path = tmp / "data" / f"part-{r}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(table, path)
        paths.append(path)
    return paths


def run_spark(spark, data_dir: Path, budget_bytes: int, gather_batch: int) -> dict[str, Any]:
    import functools

    from pyspark.sql import functions as F

    df = spark.read.parquet(str(data_dir))
    if df.rdd.getNumPartitions() != 2:
        df = df.coalesce(2)
    frame = df.select(F.col("features").alias("__features"), F.col("label").alias("__label"),
                      F.col("row").alias("__row"), F.lit(0).cast("byte").alias("__split"))
    t0 = time.perf_counter()
    rows = frame.mapInArrow(functools.partial(feed_task, budget_bytes, gather_batch), "r string",
                            barrier=True).collect()
    wall = time.perf_counter() - t0
    return _combine([json.loads(r.r) for r in rows], wall)


def run_pyarrow(paths: list[Path], gather_batch: int, tmp: Path) -> dict[str, Any]:
    outs = [tmp / f"pyarrow-{r}.json" for r in range(len(paths))]
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "import bench_feed as b; "
            "b.pyarrow_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])")
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as Spark sets it for a 1-cpu task
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", code, str(p), str(r),
                               str(gather_batch), str(o)], env=env)
             for r, (p, o) in enumerate(zip(paths, outs))]
    for proc in procs:
        if proc.wait(timeout=600):
            raise RuntimeError(f"pyarrow worker failed with exit code {proc.returncode}")
    wall = time.perf_counter() - t0
    return _combine([json.loads(o.read_text()) for o in outs], wall)


def _combine(ranks: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    rows = sum(r["rows"] for r in ranks)
    slow = max(ranks, key=lambda r: r["total_s"])
    return {"rows_per_s": rows / slow["total_s"],
            "build_rows_per_s": rows / max(r["build_s"] for r in ranks),
            "gather_rows_per_s": rows / max(r["gather_s"] for r in ranks),
            "end_to_end_rows_per_s": rows / wall,
            "peak_over_arrow": max(r["peak_rss_delta"] / r["arrow_nbytes"] for r in ranks),
            "anon_over_arrow": max(r["rss_anon_delta"] / r["arrow_nbytes"] for r in ranks),
            "ranks": sorted(ranks, key=lambda r: r["rank"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--gather-batch", type=int, default=256)
    p.add_argument("--spill-budget-mb", type=float, default=8.0)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_feed_"))
    try:
        paths = write_data(args.rows, tmp)
        spark = spark_session("bench_feed", **{
            # one partition per file: no splitting, no packing of the two files together
            "spark.sql.files.maxPartitionBytes": str(2**30),
            "spark.sql.files.openCostInBytes": str(2**30),
            # a fresh Python worker per task: a clean RSS baseline, imports paid like pyarrow's
            "spark.python.worker.reuse": "false"})
        runners = {
            "spark_memory": lambda: run_spark(spark, paths[0].parent, 2**40, args.gather_batch),
            "spark_spilled": lambda: run_spark(spark, paths[0].parent,
                                               int(args.spill_budget_mb * 2**20),
                                               args.gather_batch),
            "pyarrow": lambda: run_pyarrow(paths, args.gather_batch, tmp)}
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in runners}
        for rep in range(args.reps + 1):  # round 0 warms up the JVM, workers and page cache
            for name, fn in runners.items():
                r = fn()
                print(f"round {rep} {name}: {r['rows_per_s']:,.0f} rows/s (build "
                      f"{r['build_rows_per_s']:,.0f}, gather {r['gather_rows_per_s']:,.0f}), "
                      f"peak RSS {r['peak_over_arrow']:.2f}x Arrow", flush=True)
                if rep:
                    results[name].append(r)
        keys = ("rows_per_s", "build_rows_per_s", "gather_rows_per_s", "end_to_end_rows_per_s",
                "peak_over_arrow", "anon_over_arrow")
        stats = {name: {k: summary([r[k] for r in rs]) for k in keys}
                 for name, rs in results.items()}
        ratios = {f"{a}/pyarrow.{k}": paired_ratios([r[k] for r in results[a]],
                                                    [r[k] for r in results["pyarrow"]])
                  for a in ("spark_memory", "spark_spilled")
                  for k in ("rows_per_s", "build_rows_per_s", "gather_rows_per_s",
                            "end_to_end_rows_per_s")}
        record = {"config": {"rows": args.rows, "width": WIDTH, "ranks": 2, "reps": args.reps,
                             "gather_batch": args.gather_batch,
                             "spill_budget_mb": args.spill_budget_mb,
                             "arrow_max_records_per_batch": spark.conf.get(
                                 "spark.sql.execution.arrow.maxRecordsPerBatch")},
                  "stats": stats, "ratios": ratios, "runs": results}
        path = write_result("feed", record)
        for name, s in stats.items():
            print(f"{name}: {s['rows_per_s']['median']:,.0f} rows/s, peak RSS "
                  f"{s['peak_over_arrow']['median']:.2f}x the shard's Arrow size")
        for k, v in ratios.items():
            print(f"{k}: {v['median']:.2f}")
        print(f"appended to {path}")
        spark.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
