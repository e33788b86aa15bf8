"""Allreduce bandwidth inside training against raw ``dist.all_reduce`` of the same size.

    python benchmarks/bench_allreduce.py [--hidden-sets 256,256 1024,1024 --reps 5]

For each model, one round is: a 2-rank ``fit`` (gloo, DDP with the library's timed comm hook),
then a fresh pair of gloo processes on loopback timing ``dist.all_reduce`` of a float32 tensor
of the model's gradient size. Rounds alternate; figures are medians over rounds.

Definitions:
- gradient bytes per step: the model's trainable parameters x 4 bytes (float32, no compression).
- in-training comm time: the median over rank 0's metric windows of epochs 2..E of
  ``time/comm_s`` (per step: the sum over DDP buckets of launch-to-completion of the allreduce,
  which can overlap backward compute; with several buckets in flight at once it is a sum, not a
  wall time).
- raw time: median over ``--iters`` synchronous ``dist.all_reduce`` calls on rank 0 after warm-up.
- algorithm bandwidth = bytes / time (MB/s, 1 MB = 1e6 bytes); for 2 ranks the ring moves about
  the same number of bytes per rank, so bus bandwidth = algorithm bandwidth.
- comm share: median of ``time/comm_share`` = comm_s / (comm_s + compute_s), and comm_s / step_s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    median,
    paired_ratios,
    setup_env,
    spark_session,
    summary,
    write_result,
)

setup_env()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_worker(rank: int, port: int, numels: list[int], warmup: int, iters: int,
                out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # as in a Spark task (OMP_NUM_THREADS=1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    result = {}
    for n in numels:
        t = torch.randn(n)
        times = []
        for i in range(warmup + iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        result[str(n)] = float(np.median(times))
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def raw_allreduce(numels: list[int], warmup: int, iters: int, tmp: Path) -> dict[int, float]:
    """Median seconds per all_reduce of each float32 size, 2 fresh gloo processes."""
    import torch.multiprocessing as mp

    out = tmp / "raw.json"
    mp.start_processes(_raw_worker, args=(_free_port(), numels, warmup, iters, str(out)),
                       nprocs=2, join=True, start_method="spawn")
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


def grad_numel(hidden: list[int], in_features: int = 64, classes: int = 10) -> int:
    from sparkml_dist.models import mlp

    model = mlp(in_features, classes, hidden=hidden)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fit_comm(df, uri: str, hidden: list[int], args: argparse.Namespace) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from sparkml_dist import fit

    res = fit(df, **{
        "data.features_col": "features", "data.val_fraction": 0.0,
        "training.epochs": args.epochs, "training.num_workers": 2,
        "training.batch_size": args.batch_size, "model.kwargs": {"hidden": hidden},
        "checkpoint.enabled": False, "tracking.tracking_uri": uri,
        "tracking.progress": False, "tracking.log_model": False})
    client = MlflowClient(uri)
    steps_per_epoch = args.rows // 2 // args.batch_size

    def steady(key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(res.run_id, key)
                if m.step > steps_per_epoch]

    comm, step = steady("time/comm_s"), steady("time/step_s")
    return {"comm_s": median(comm), "step_s": median(step),
            "comm_share": median(steady("time/comm_share")),
            "comm_over_step": median([c / s for c, s in zip(comm, step)])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-sets", nargs="+", default=["256,256", "1024,1024"])
    p.add_argument("--rows", type=int, default=10240)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args()
    models = [[int(h) for h in s.split(",")] for s in args.hidden_sets]
    numels = [grad_numel(h) for h in models]

    import pyarrow as pa

    from sparkml_dist.datasets import digits_table

    tmp = Path(tempfile.mkdtemp(prefix="bench_allreduce_"))
    try:
        spark = spark_session("bench_allreduce")
        base = digits_table()
        df = spark.createDataFrame(base.take(pa.array(np.arange(args.rows) % base.num_rows)))
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        train: dict[int, list[dict[str, float]]] = {n: [] for n in numels}
        raw: dict[int, list[float]] = {n: [] for n in numels}
        for rep in range(args.reps + 1):  # round 0 is a warm-up
            for hidden, n in zip(models, numels):
                r = fit_comm(df, uri, hidden, args)
                if rep:
                    train[n].append(r)
                print(f"round {rep} fit hidden={hidden}: comm {r['comm_s'] * 1e3:.2f} ms/step "
                      f"of {r['step_s'] * 1e3:.2f} ms", flush=True)
            times = raw_allreduce(numels, warmup=20, iters=args.iters, tmp=tmp)
            print(f"round {rep} raw: " + ", ".join(f"{n * 4 / 1e6:.2f} MB {t * 1e3:.2f} ms"
                                                   for n, t in times.items()), flush=True)
            if rep:
                for n in numels:
                    raw[n].append(times[n])
        per_model = []
        for hidden, n in zip(models, numels):
            nbytes = n * 4
            train_bw = [nbytes / r["comm_s"] / 1e6 for r in train[n]]
            raw_bw = [nbytes / t / 1e6 for t in raw[n]]
            per_model.append({
                "hidden": hidden, "grad_numel": n, "grad_bytes": nbytes,
                "train_comm_s": summary([r["comm_s"] for r in train[n]]),
                "train_step_s": summary([r["step_s"] for r in train[n]]),
                "raw_allreduce_s": summary(raw[n]),
                "train_algbw_MBps": summary(train_bw), "raw_algbw_MBps": summary(raw_bw),
                "ratio_train_over_raw_bw": paired_ratios(train_bw, raw_bw),
                "comm_share": summary([r["comm_share"] for r in train[n]]),
                "comm_over_step": summary([r["comm_over_step"] for r in train[n]]),
            })
        record = {"config": {"rows": args.rows, "epochs": args.epochs,
                             "batch_size_per_rank": args.batch_size, "ranks": 2,
                             "backend": "gloo", "reps": args.reps, "raw_iters": args.iters},
                  "models": per_model}
        path = write_result("allreduce", record)
        for m in per_model:
            print(f"hidden={m['hidden']} ({m['grad_bytes'] / 1e6:.2f} MB): in training "
                  f"{m['train_algbw_MBps']['median']:,.0f} MB/s, raw "
                  f"{m['raw_algbw_MBps']['median']:,.0f} MB/s, ratio "
                  f"{m['ratio_train_over_raw_bw']['median']:.2f}; comm share "
                  f"{m['comm_share']['median']:.2f}")
        print(f"appended to {path}")
        spark.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
