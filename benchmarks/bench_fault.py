"""Fault-tolerance costs: checkpoint overhead and time from a worker's death to training again.

1. Checkpoint overhead: median step time (``time/step_s``, which includes checkpoint writes)
   with checkpoints every 10 steps against no checkpoints, alternating, 5 runs each.
2. Recovery: rank 1 exits hard mid-epoch (``fault.inject``); recovery time is the gap between
   the last step logged before the death and the first step logged after the relaunch (metrics
   every step), i.e. failure detection + back-off (0 here) + relaunch + rendezvous + checkpoint
   restore + one step. Reported against the median step time.

    python benchmarks/bench_fault.py            # writes benchmarks/results/fault.jsonl
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from common import machine_info, paired_ratios, setup_env, spark_session, write_result
from mlflow.tracking import MlflowClient

REPS = 5


def config(uri: str, **extra):
    from sparkml_dist import JobConfig

    base = {"data.features_col": "features", "model.kwargs": {"hidden": [256, 256]},
            "training.num_workers": 2, "training.batch_size": 64, "training.epochs": 4,
            "training.log_every_steps": 1, "checkpoint.every_steps": 10,
            "fault.backoff_s": 0.0, "tracking.tracking_uri": uri, "tracking.log_model": False,
            "tracking.progress": False}
    base.update(extra)
    return JobConfig().replace(**base)


def median_step_s(client: MlflowClient, run_id: str) -> float:
    hist = sorted(client.get_metric_history(run_id, "time/step_s"), key=lambda m: m.step)
    return statistics.median(m.value for m in hist[len(hist) // 4:])  # skip warm-up


def main() -> None:
    setup_env()
    from sparkml_dist import fit
    from sparkml_dist.datasets import digits_table

    spark = spark_session("bench-fault")
    tmp = Path(tempfile.mkdtemp())
    table = digits_table()
    import pyarrow as pa

    big = pa.concat_tables([table] * 10)  # ~18k rows: 112 steps per epoch per rank
    df = spark.createDataFrame(big.to_pandas())
    df.cache().count()
    with_ckpt, without = [], []
    for i in range(REPS):
        for enabled, out in ((True, with_ckpt), (False, without)):
            uri = f"sqlite:///{tmp / f'ck{i}{enabled}.db'}"
            res = fit(df, config(uri, **{"checkpoint.enabled": enabled}))
            out.append(median_step_s(MlflowClient(uri), res.run_id))
    overhead = paired_ratios(with_ckpt, without)
    recoveries, steps = [], []
    for i in range(3):
        uri = f"sqlite:///{tmp / f'rec{i}.db'}"
        res = fit(df, config(uri, **{"fault.inject": {"rank": 1, "step": 150, "attempt": 0}}))
        client = MlflowClient(uri)
        hist = client.get_metric_history(res.run_id, "train/loss")
        before = max((m for m in hist if m.step <= 150), key=lambda m: m.timestamp)
        after = min((m for m in hist if m.timestamp > before.timestamp), key=lambda m: m.timestamp)
        recoveries.append((after.timestamp - before.timestamp) / 1000.0)
        steps.append(median_step_s(client, res.run_id))
    record = {
        "benchmark": "fault", "machine": machine_info(),
        "step_s_with_checkpoints_every_10": statistics.median(with_ckpt),
        "step_s_without_checkpoints": statistics.median(without),
        "checkpoint_overhead_ratio": overhead,
        "recovery_s_median": statistics.median(recoveries), "recovery_s_all": recoveries,
        "recovery_in_steps": statistics.median(recoveries) / statistics.median(steps),
    }
    path = write_result("fault", record)
    print({k: v for k, v in record.items() if k != "machine"}, "->", path)
    spark.stop()


if __name__ == "__main__":
    main()
