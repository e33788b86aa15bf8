"""Steady-state training throughput with 2 ranks: sparkml_dist ``fit`` against the same DDP loop
launched by PySpark's ``TorchDistributor`` (local mode) and by ``torchrun``.

    python benchmarks/bench_training.py [--rows 40960 --epochs 5 --batch-size 64 --reps 5]

The peers' loop uses torch's default Adam, as a user's loop would; ``fit`` uses torch's fused
Adam kernel (``optimizer.fused``, its default). A fourth runner, ``torchrun_fused_adam``, runs
the peer loop with the fused kernel too, so the ratio against it shows what ``fit`` costs beyond
the kernel choice.

The runners take turns after one discarded warm-up round, in an order that rotates each round
(a b c d, b c d a, ...), so none always runs first or after the same one; each figure is the
median over repetitions and each ratio the median of per-round ratios.

Definitions (all wall clock, rank 0):
- samples/s (steady state): samples of epochs 2..E over the time those epochs took (the first
  epoch is excluded). For ``fit`` the time runs from the MLflow timestamp of rank 0's end-of-epoch-1
  metrics to that of its last metrics, so metric logging is inside it; ``fit_metric_samples_per_s``
  is what the library's own ``perf/samples_per_s`` windows add up to over the same epochs.
- launch to first step: from the launcher call (``fit()``, ``TorchDistributor(...).run``,
  ``Popen(torchrun ...)``) to the start of the first optimizer step on rank 0. For ``fit`` the
  start is derived from the first metrics: ``timestamp - steps_in_window * time/step_s``.
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
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    BENCH_DIR,
    median,
    paired_ratios,
    setup_env,
    spark_session,
    summary,
    write_result,
)

setup_env()


def make_data(rows: int, tmp: Path):
    """Digits repeated to ``rows`` rows: an Arrow table for Spark and the same rows as ``.npz``."""
    import pyarrow as pa

    from sparkml_dist.datasets import digits_table

    base = digits_table()
    table = base.take(pa.array(np.arange(rows) % base.num_rows))
    x = np.asarray(table.column("features").combine_chunks().flatten(), dtype=np.float32)
    y = table.column("label").to_numpy()
    npz = tmp / "digits.npz"
    np.savez(npz, x=x.reshape(rows, -1), y=y)
    return table, npz


def run_fit(df, uri: str, args: argparse.Namespace) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from sparkml_dist import fit

    t_launch = time.time()
    res = fit(df, **{
        "data.features_col": "features", "data.val_fraction": 0.0,
        "training.epochs": args.epochs, "training.num_workers": 2,
        "training.batch_size": args.batch_size, "model.kwargs": {"hidden": args.hidden},
        "checkpoint.enabled": False, "tracking.tracking_uri": uri,
        "tracking.progress": False, "tracking.log_model": False})
    t_end = time.time()
    client = MlflowClient(uri)
    rate = client.get_metric_history(res.run_id, "perf/samples_per_s")
    step_s = {m.step: m.value for m in client.get_metric_history(res.run_id, "time/step_s")}
    epoch = {m.step: m.value for m in client.get_metric_history(res.run_id, "progress/epoch")}
    rate.sort(key=lambda m: m.step)
    first = rate[0]
    steps_per_epoch = int(args.rows / 2 / args.batch_size)
    total = steps_per_epoch * args.epochs
    end_e1 = next(m for m in rate if m.step == steps_per_epoch)
    last = rate[-1]
    assert last.step == total, (last.step, total)
    samples = (total - steps_per_epoch) * args.batch_size * 2
    # The library's own view: its per-window step times over epochs 2..E.
    prev, window_time = steps_per_epoch, 0.0
    for m in rate:
        if m.step > steps_per_epoch:
            window_time += step_s[m.step] * (m.step - prev)
            prev = m.step
    run = client.get_run(res.run_id)
    first_step_unix = first.timestamp / 1000 - first.step * step_s[first.step]
    assert epoch[last.step] == args.epochs
    return {"samples_per_s": samples / ((last.timestamp - end_e1.timestamp) / 1000),
            "fit_metric_samples_per_s": samples / window_time,
            "launch_to_first_step_s": first_step_unix - t_launch,
            "launch_to_run_created_s": run.info.start_time / 1000 - t_launch,
            "total_s": t_end - t_launch, "run_id": res.run_id}


def _from_ddp_result(r: dict[str, Any], t_launch: float, t_end: float) -> dict[str, Any]:
    steady = r["epoch_s"][1:]
    cpu = r["epoch_cpu_s"][1:]
    return {"samples_per_s": r["samples_per_epoch"] * len(steady) / sum(steady),
            "cpu_ms_per_step": sum(cpu) / (r["steps_per_epoch"] * len(cpu)) * 1e3,
            "launch_to_first_step_s": r["first_step_unix"] - t_launch,
            "total_s": t_end - t_launch, "torch_threads": r["torch_threads"]}


def run_distributor(npz: Path, args: argparse.Namespace) -> dict[str, Any]:
    import ddp_loop
    from pyspark.ml.torch.distributor import TorchDistributor

    t_launch = time.time()
    r = TorchDistributor(num_processes=2, local_mode=True, use_gpu=False).run(
        ddp_loop.train, str(npz), args.epochs, args.batch_size, args.hidden)
    return _from_ddp_result(r, t_launch, time.time())


def run_torchrun(npz: Path, args: argparse.Namespace, tmp: Path, extras: tuple[str, ...] = (),
                 tracking_uri: str | None = None, fused: bool = False) -> dict[str, Any]:
    out = tmp / "torchrun_result.json"
    out.unlink(missing_ok=True)
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", "--nproc_per_node", "2", str(BENCH_DIR / "ddp_loop.py"),
           "--data", str(npz), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--hidden", *map(str, args.hidden), "--out", str(out)]
    if fused:
        cmd.append("--fused")
    if extras:
        cmd += ["--extras", *extras, "--tracking-uri", tracking_uri or f"sqlite:///{tmp}/ddp.db"]
    for attempt in range(2):  # retry once, counted in the result (none seen since ddp_loop
                              # drops its DDP model before destroying the process group)
        t_launch = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        t_end = time.time()
        if proc.returncode == 0:
            return {**_from_ddp_result(json.loads(out.read_text()), t_launch, t_end),
                    "retries": attempt}
        print(f"torchrun failed ({proc.returncode}), attempt {attempt}:\n{proc.stderr[-2000:]}",
              file=sys.stderr)
    raise RuntimeError("torchrun failed twice; see the output above")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=40960)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if args.rows % (2 * args.batch_size):
        p.error("--rows must be a multiple of 2 * --batch-size (equal full batches on each rank)")
    # TorchDistributor pickles ddp_loop.train by reference; its torchrun children import it.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH_DIR)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))

    tmp = Path(tempfile.mkdtemp(prefix="bench_training_"))
    try:
        spark = spark_session("bench_training")
        table, npz = make_data(args.rows, tmp)
        df = spark.createDataFrame(table)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        runners = {"sparkml_dist": lambda: run_fit(df, uri, args),
                   "torch_distributor": lambda: run_distributor(npz, args),
                   "torchrun": lambda: run_torchrun(npz, args, tmp),
                   "torchrun_fused_adam": lambda: run_torchrun(npz, args, tmp, fused=True)}
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in runners}
        names = list(runners)
        for rep in range(args.reps + 1):  # round 0 warms up the JVM, MLflow store and caches
            # The order rotates each round, so no runner always follows the same one.
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                r = runners[name]()
                print(f"round {rep} {name}: {r['samples_per_s']:,.0f} samples/s, first step after "
                      f"{r['launch_to_first_step_s']:.1f}s, total {r['total_s']:.1f}s", flush=True)
                if rep:
                    results[name].append(r)
        rates = {k: [r["samples_per_s"] for r in v] for k, v in results.items()}
        record = {
            "config": {"rows": args.rows, "epochs": args.epochs, "batch_size_per_rank":
                       args.batch_size, "hidden": args.hidden, "ranks": 2, "reps": args.reps,
                       "model": "sparkml_dist.models:mlp", "optimizer": "adam lr=1e-3",
                       "fit_overrides": {"data.val_fraction": 0.0, "checkpoint.enabled": False},
                       "fit_optimizer_fused": True, "peer_optimizer": "torch default Adam "
                       "(torchrun_fused_adam: fused=True)"},
            "samples_per_s": {k: summary(v) for k, v in rates.items()},
            "fit_metric_samples_per_s": summary(
                [r["fit_metric_samples_per_s"] for r in results["sparkml_dist"]]),
            "launch_to_first_step_s": {k: summary([r["launch_to_first_step_s"] for r in v])
                                       for k, v in results.items()},
            "fit_launch_to_run_created_s": summary(
                [r["launch_to_run_created_s"] for r in results["sparkml_dist"]]),
            "total_s": {k: summary([r["total_s"] for r in v]) for k, v in results.items()},
            "ratio_samples_per_s": {
                "sparkml_dist/torch_distributor": paired_ratios(rates["sparkml_dist"],
                                                                rates["torch_distributor"]),
                "sparkml_dist/torchrun": paired_ratios(rates["sparkml_dist"], rates["torchrun"]),
                # the same loop with the fused Adam kernel fit uses: the gap left without it
                "sparkml_dist/torchrun_fused_adam": paired_ratios(
                    rates["sparkml_dist"], rates["torchrun_fused_adam"]),
            },
            "runs": results,
        }
        path = write_result("training", record)
        print(json.dumps({k: record[k] for k in ("samples_per_s", "ratio_samples_per_s",
                                                 "launch_to_first_step_s")}, indent=1))
        print("median samples/s: " + ", ".join(f"{k} {median(v):,.0f}" for k, v in rates.items()))
        print(f"appended to {path}")
        spark.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
