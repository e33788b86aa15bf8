"""Training with a straggler: one rank slowed 2x by a sleep in every training forward pass.

Runs on local Spark (2 workers, digits, an MLP) through ``sparkml_dist.fit``, all strategies on
the same prepared data, with the same straggler mechanism (the model factory below sleeps
``sleep_s`` per training forward on rank ``straggler``; ``sleep_s`` is the measured step time
of synchronous allreduce without a straggler, so the straggler's steps take about twice as long):

1. Straggler: samples/s of parameter-server ``async`` and ``ssp``, of synchronous ``gossip`` and
   of asynchronous ``gossip_async`` against
   synchronous allreduce (``data_parallel``). Goal: >= 1.5x within 1.5 points of accuracy.
2. No straggler: parameter-server ``sync`` against allreduce. Goal: >= 0.8x.

samples/s: for allreduce and gossip the library's ``perf/samples_per_s`` (median over windows,
rank 0; its steps wait for the straggler); for asynchronous gossip (``gossip_async``,
``strategy.algorithm: async_push_sum``) the job's training samples over its training wall time
(the sums over epochs of ``perf/epoch_samples`` and ``perf/epoch_train_s``: each epoch up to its
cut, which waits for the straggler's last step; validation and checkpoints excluded, as for the
others), beside it each rank's ``gossip/rank_<r>/steps_per_s``; for the parameter servers
``ps/aggregate_samples_per_s`` (the sum of the workers' own rates: what the job consumes while
every worker runs) and, beside it, ``ps/samples_per_s`` (all samples over the whole stage, which
the straggler's last steps bound, since every worker owns a fixed shard).

Each configuration runs once per repetition (``--reps``), back to back; ratios are medians of
the per-repetition ratios (the machines are shared and noisy). Writes one JSON line to
``benchmarks/results/straggler.jsonl``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, median, paired_ratios, setup_env, spark_session, write_result


def slow_mlp(in_features: int, num_outputs: int, hidden: list[int], straggler: int = -1,
             sleep_s: float = 0.0):
    """``sparkml_dist.models.mlp`` whose training forward sleeps ``sleep_s`` on the Spark task
    with partition id ``straggler`` (rank or parameter-server worker)."""
    import torch

    from sparkml_dist.models import mlp

    class Slow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(in_features, num_outputs, hidden=hidden)

        def forward(self, x):
            if self.training and sleep_s > 0:
                from pyspark import TaskContext

                ctx = TaskContext.get()
                if ctx is not None and ctx.partitionId() == straggler:
                    time.sleep(sleep_s)
            return self.net(x)

    return Slow()


def _fit(df, uri: str, args, kind: dict[str, Any], straggler: int, sleep_s: float
         ) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from sparkml_dist import fit

    t0 = time.monotonic()
    res = fit(df, **{
        "data.features_col": "features", "data.val_fraction": 0.2,
        "training.epochs": args.epochs, "training.num_workers": 2,
        "training.batch_size": args.batch_size, "training.seed": 7,
        "optimizer.name": "sgd", "optimizer.lr": 0.1, "optimizer.momentum": 0.5,
        "model.factory": "bench_straggler:slow_mlp",
        "model.kwargs": {"hidden": args.hidden, "straggler": straggler, "sleep_s": sleep_s},
        "checkpoint.enabled": False, "tracking.tracking_uri": uri, "tracking.progress": False,
        "tracking.log_model": False, **kind})
    m = dict(res.metrics)
    out = {"val_accuracy": m.get("val/accuracy"), "fit_s": time.monotonic() - t0}
    if kind["strategy.kind"] == "parameter_server":
        out["samples_per_s"] = m["ps/aggregate_samples_per_s"]
        out["stage_samples_per_s"] = m["ps/samples_per_s"]
        out["staleness_mean"] = m["ps/staleness_mean"]
        out["worker_steps_per_s"] = [m["ps/worker_0/steps_per_s"], m["ps/worker_1/steps_per_s"]]
    elif kind.get("strategy.algorithm") == "async_push_sum":
        # Each epoch's samples over its wall time up to the cut (training only, as the
        # windows of the others): the job's total samples over the job's training time.
        client = MlflowClient(uri)
        samples = sum(x.value for x in client.get_metric_history(res.run_id,
                                                                 "perf/epoch_samples"))
        secs = sum(x.value for x in client.get_metric_history(res.run_id, "perf/epoch_train_s"))
        out["samples_per_s"] = samples / secs
        out["rank_steps_per_s"] = [m[f"gossip/rank_{r}/steps_per_s"] for r in range(2)]
    else:
        client = MlflowClient(uri)
        rates = [x.value for x in client.get_metric_history(res.run_id, "perf/samples_per_s")]
        steps = [x.value for x in client.get_metric_history(res.run_id, "time/step_s")]
        out["samples_per_s"] = statistics.median(rates)
        out["step_s"] = statistics.median(steps)
    return out


KINDS = {
    "allreduce": {"strategy.kind": "data_parallel"},
    "ps_sync": {"strategy.kind": "parameter_server", "strategy.mode": "sync"},
    "ps_async": {"strategy.kind": "parameter_server", "strategy.mode": "async"},
    "ps_ssp": {"strategy.kind": "parameter_server", "strategy.mode": "ssp",
               "strategy.staleness": 4},
    "gossip": {"strategy.kind": "gossip", "strategy.topology": "ring"},
    "gossip_async": {"strategy.kind": "gossip", "strategy.topology": "ring",
                     "strategy.algorithm": "async_push_sum"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kinds", nargs="+", choices=[k for k in KINDS if k != "allreduce"],
                   default=[k for k in KINDS if k != "allreduce"],
                   help="configurations to run beside allreduce (default: all)")
    args = p.parse_args()
    setup_env()
    os.environ["PYTHONPATH"] = os.pathsep.join(  # executors import slow_mlp from here
        [str(BENCH_DIR)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    sys.path.insert(0, str(BENCH_DIR))
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench_straggler_"))
    from sparkml_dist.datasets import write_digits_parquet

    spark = spark_session("bench_straggler")
    df = spark.read.parquet(str(write_digits_parquet(tmp / "digits.parquet")))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    _fit(df, uri, args, KINDS["allreduce"], -1, 0.0)  # warm-up: JVM, MLflow store, caches
    base_runs: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ["allreduce", "ps_sync"] if k == "allreduce" or k in args.kinds}
    slow_runs: dict[str, list[dict[str, Any]]] = {
        k: [] for k in KINDS if k != "ps_sync" and (k == "allreduce" or k in args.kinds)}
    for _ in range(args.reps):  # every configuration once per repetition, back to back
        for name in base_runs:
            base_runs[name].append(_fit(df, uri, args, KINDS[name], -1, 0.0))
        sleep_s = base_runs["allreduce"][-1]["step_s"]
        for name in slow_runs:
            slow_runs[name].append(_fit(df, uri, args, KINDS[name], 1, sleep_s))
    rate = {n: [r["samples_per_s"] for r in v] for n, v in {**base_runs, **{
        f"slow_{k}": v for k, v in slow_runs.items()}}.items()}
    ref = slow_runs["allreduce"]
    record = {
        "setup": {"data": "digits (1797 rows, 20% validation)", "workers": 2,
                  "epochs": args.epochs, "batch_size": args.batch_size, "hidden": args.hidden,
                  "spark": "local[2]", "straggler": "rank 1 sleeps sleep_s per training forward",
                  "sleep_s": [r["step_s"] for r in base_runs["allreduce"]],
                  "ssp_staleness": KINDS["ps_ssp"]["strategy.staleness"], "reps": args.reps,
                  "kinds": ["allreduce", *args.kinds]},
        "no_straggler": {**base_runs, "goal": ">= 0.8", **({
            "ps_sync_vs_allreduce": paired_ratios(rate["ps_sync"], rate["allreduce"])}
            if "ps_sync" in base_runs else {})},
        "straggler": {**slow_runs, "goal": ">= 1.5x allreduce within 1.5 accuracy points",
                      "speedup_vs_allreduce": {
                          k: paired_ratios(rate[f"slow_{k}"], rate["slow_allreduce"])
                          for k in slow_runs if k != "allreduce"},
                      "accuracy_gap_points": {
                          k: median([100 * (a["val_accuracy"] - b["val_accuracy"])
                                     for a, b in zip(v, ref)])
                          for k, v in slow_runs.items() if k != "allreduce"}},
    }
    path = write_result("straggler", record)
    if "ps_sync" in base_runs:
        print(f"no straggler: ps sync / allreduce = "
              f"{record['no_straggler']['ps_sync_vs_allreduce']['median']:.2f} (median of "
              f"{args.reps})")
    for k, v in record["straggler"]["speedup_vs_allreduce"].items():
        print(f"straggler: {k} {v['median']:.2f}x allreduce, accuracy "
              f"{record['straggler']['accuracy_gap_points'][k]:+.1f} points")
    print(f"wrote {path}")
    spark.stop()


if __name__ == "__main__":
    main()
