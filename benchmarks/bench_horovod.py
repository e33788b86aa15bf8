"""Horovod against torch.distributed (gloo) with 2 ranks on loopback, in the same run.

    python benchmarks/bench_horovod.py [--reps 5 --fit-reps 3 --rows 8192 --epochs 3]

1. Allreduce throughput: two spawned processes join both a gloo process group and Horovod (over
   Gloo, through :mod:`sparkml_dist.comm.horovod_gloo`) and sum float32 tensors of 4 KiB to
   64 MiB (powers of 4). Per size, the backends run alternately (one discarded warm-up each, then
   ``--reps`` repetitions of a fixed number of blocking allreduces, ranks aligned by a barrier
   before each). Throughput is message bytes per second of one allreduce (algorithm bandwidth),
   timed on rank 0; ratios are Horovod / torch, the median of per-repetition ratios.
2. End to end: ``sparkml_dist.fit`` of the same job with ``backend.name`` torch and horovod,
   alternating, ``--fit-reps`` each after one discarded warm-up pair. samples/s is the steady
   state of rank 0: samples of epochs 2..E over the time between the MLflow timestamps of its
   end-of-epoch-1 and last metrics (as in bench_training.py); ``fit_wall_s`` is the whole
   ``fit()`` call, Spark launch and MLflow included.

Results: one JSON line per message size and one for the end-to-end comparison, appended to
``benchmarks/results/horovod.jsonl`` with the machine description.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import (REPO, median, paired_ratios, setup_env, spark_session, summary,
                    write_result)

setup_env()
SIZES = [4 * 2**10 * 4**i for i in range(8)]  # 4 KiB, 16 KiB, ..., 64 MiB
TIMEOUT_S = 120.0


def _ops_per_rep(nbytes: int) -> int:
    """Enough allreduces for a measurable repetition, without hours at 64 MiB."""
    return int(max(3, min(200, (128 * 2**20) // nbytes)))


def _worker(rank: int, store_port: int, hvd_port: int, sizes: list[int], reps: int,
            out: Any) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from sparkml_dist.comm.horovod_gloo import init_horovod

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", store_port, 2, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    init_horovod(rank, 2, "127.0.0.1", hvd_port, "localhost", TIMEOUT_S)
    import horovod.torch as hvd

    def run(backend: str, x: torch.Tensor, n: int, name: str) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            if backend == "horovod":
                hvd.allreduce_(x, op=hvd.Sum, name=name)
            else:
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return (time.perf_counter() - t0) / n

    results = []
    for nbytes in sizes:
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        n = _ops_per_rep(nbytes)
        name = f"bench.{nbytes}"
        times: dict[str, list[float]] = {"horovod": [], "torch": []}
        for rep in range(reps + 1):  # rep 0: warm-up, discarded
            for backend in ("horovod", "torch") if rep % 2 == 0 else ("torch", "horovod"):
                dt = run(backend, x, n, name)
                if rep:
                    times[backend].append(dt)
        results.append({"bytes": nbytes, "ops_per_rep": n, **times})
    hvd.shutdown()
    dist.destroy_process_group()
    if rank == 0:
        out.put(results)


def bench_allreduce(reps: int) -> list[dict[str, Any]]:
    import torch.distributed as dist

    from sparkml_dist.comm.horovod_gloo import start_rendezvous_server, stop_rendezvous_server

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    server, hvd_port = start_rendezvous_server(2, "localhost")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, store.port, hvd_port, SIZES, reps, out))
             for r in range(2)]
    try:
        for p in procs:
            p.start()
        raw = out.get(timeout=1800)
        for p in procs:
            p.join(TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        stop_rendezvous_server(server)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"allreduce workers exited with {[p.exitcode for p in procs]}")
    rows = []
    for r in raw:
        hvd_bps = [r["bytes"] / t for t in r["horovod"]]
        torch_bps = [r["bytes"] / t for t in r["torch"]]
        rows.append({
            "kind": "allreduce", "bytes": r["bytes"], "dtype": "float32", "op": "sum",
            "world_size": 2, "ops_per_rep": r["ops_per_rep"],
            "horovod_MBps": summary([b / 1e6 for b in hvd_bps]),
            "torch_gloo_MBps": summary([b / 1e6 for b in torch_bps]),
            "horovod_latency_us": summary([t * 1e6 for t in r["horovod"]]),
            "torch_gloo_latency_us": summary([t * 1e6 for t in r["torch"]]),
            "throughput_ratio_horovod_over_torch": paired_ratios(hvd_bps, torch_bps),
        })
    return rows


def run_fit(df, backend: str, uri: str, args: argparse.Namespace) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from sparkml_dist import fit

    t0 = time.time()
    res = fit(df, **{
        "data.features_col": "features", "data.val_fraction": 0.0,
        "training.epochs": args.epochs, "training.num_workers": 2,
        "training.batch_size": args.batch_size, "model.kwargs": {"hidden": args.hidden},
        "backend.name": backend, "checkpoint.enabled": False, "tracking.tracking_uri": uri,
        "tracking.progress": False, "tracking.log_model": False})
    wall = time.time() - t0
    client = MlflowClient(uri)
    rate = sorted(client.get_metric_history(res.run_id, "perf/samples_per_s"),
                  key=lambda m: m.step)
    comm = {m.step: m.value for m in client.get_metric_history(res.run_id, "time/comm_share")}
    steps_per_epoch = args.rows // (2 * args.batch_size)
    end_e1 = next(m for m in rate if m.step == steps_per_epoch)
    last = rate[-1]
    assert last.step == steps_per_epoch * args.epochs, (last.step, steps_per_epoch)
    samples = (last.step - steps_per_epoch) * args.batch_size * 2
    steady = [comm[m.step] for m in rate if m.step > steps_per_epoch]
    return {"samples_per_s": samples / ((last.timestamp - end_e1.timestamp) / 1000),
            "fit_wall_s": wall, "comm_share": median(steady), "run_id": res.run_id}


def bench_fit(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow as pa

    from sparkml_dist.datasets import digits_table

    spark = spark_session("bench_horovod")
    base = digits_table()
    table = base.take(pa.array(np.arange(args.rows) % base.num_rows))
    df = spark.createDataFrame(table)
    per: dict[str, list[dict[str, Any]]] = {"torch": [], "horovod": []}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for rep in range(args.fit_reps + 1):  # rep 0: warm-up pair, discarded
            for backend in ("torch", "horovod") if rep % 2 == 0 else ("horovod", "torch"):
                r = run_fit(df, backend, uri, args)
                logging.info("fit %d %s: %.0f samples/s, %.1f s", rep, backend,
                             r["samples_per_s"], r["fit_wall_s"])
                if rep:
                    per[backend].append(r)
    spark.stop()

    def col(b: str, k: str) -> list[float]:
        return [r[k] for r in per[b]]

    return {
        "kind": "fit", "world_size": 2, "rows": args.rows, "epochs": args.epochs,
        "batch_size_per_rank": args.batch_size, "hidden": args.hidden, "device": "cpu",
        "torch_samples_per_s": summary(col("torch", "samples_per_s")),
        "horovod_samples_per_s": summary(col("horovod", "samples_per_s")),
        "samples_per_s_ratio_horovod_over_torch": paired_ratios(
            col("horovod", "samples_per_s"), col("torch", "samples_per_s")),
        "torch_fit_wall_s": summary(col("torch", "fit_wall_s")),
        "horovod_fit_wall_s": summary(col("horovod", "fit_wall_s")),
        "torch_comm_share": summary(col("torch", "comm_share")),
        "horovod_comm_share": summary(col("horovod", "comm_share")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="allreduce repetitions per size (>= 5)")
    p.add_argument("--fit-reps", type=int, default=3, help="fit() runs per backend (>= 3)")
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--skip-fit", action="store_true", help="allreduce sweep only")
    args = p.parse_args()
    if args.reps < 5 or args.fit_reps < 3:
        p.error("--reps must be >= 5 and --fit-reps >= 3 (medians of fewer are noise here)")
    if args.rows % (2 * args.batch_size):
        p.error("--rows must be a multiple of 2 * --batch-size (equal full batches per rank)")
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is excluded as warm-up)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import horovod

    common = {"horovod": horovod.__version__, "host": socket.gethostname()}
    for row in bench_allreduce(args.reps):
        path = write_result("horovod", {**row, **common})
        r = row["throughput_ratio_horovod_over_torch"]
        print(f"allreduce {row['bytes']:>9} B: horovod {row['horovod_MBps']['median']:9.1f} "
              f"MB/s, torch gloo {row['torch_gloo_MBps']['median']:9.1f} MB/s, "
              f"ratio {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]")
    if not args.skip_fit:
        row = bench_fit(args)
        path = write_result("horovod", {**row, **common})
        r = row["samples_per_s_ratio_horovod_over_torch"]
        print(f"fit: torch {row['torch_samples_per_s']['median']:.0f} samples/s, horovod "
              f"{row['horovod_samples_per_s']['median']:.0f} samples/s, ratio {r['median']:.2f} "
              f"[{r['min']:.2f}, {r['max']:.2f}]; fit wall torch "
              f"{row['torch_fit_wall_s']['median']:.1f} s, horovod "
              f"{row['horovod_fit_wall_s']['median']:.1f} s")
    print(f"results appended to {path}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
