"""Federated rounds on local Spark: rounds to reach a validation accuracy, and client throughput.

1. Rounds to reach ``--target`` (95%) validation accuracy on digits with 20 clients, FedAvg
   (5 local epochs of mini-batches) against FedSGD (one full-batch local step per round, the
   data-parallel-SGD reduction) on the same clients, IID and Dirichlet(0.3) label skew. Claims:
   FedAvg needs at most 1/10 of FedSGD's rounds IID and at most 1/3 non-IID. FedSGD is capped at
   ``--fedsgd-max-rounds``; a run that does not reach the target reports the cap as a lower bound
   (``reached: false``), so the ratio is then an upper bound.
2. Client throughput: client updates per second in one round against the number of clients
   (10 to 1,000), one local step each on 16 synthetic rows, median over rounds after the first.

Writes one JSON line to ``benchmarks/results/federated.jsonl``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from common import machine_info, median, setup_env, spark_session, write_result


def _cfg(tracking_uri: str, lr: float, momentum: float, val_fraction: float = 0.2):
    from sparkml_dist.config import (CheckpointConfig, DataConfig, JobConfig, ModelConfig,
                                     OptimizerConfig, TrackingConfig, TrainingConfig)

    return JobConfig(data=DataConfig(features_col="features", val_fraction=val_fraction),
                     model=ModelConfig(kwargs={"hidden": [64]}),
                     optimizer=OptimizerConfig(name="sgd", lr=lr, momentum=momentum),
                     training=TrainingConfig(seed=3),
                     checkpoint=CheckpointConfig(enabled=False),
                     tracking=TrackingConfig(tracking_uri=tracking_uri, log_model=False,
                                             progress=False))


def _run(spark, df, cfg, fed):
    from sparkml_dist.strategies.federated.driver import fit_federated
    from sparkml_dist.tracking.run import JobRun

    run = JobRun(cfg)
    t0 = time.monotonic()
    out = fit_federated(spark, df, cfg, run, fed)
    run.finish()
    hist = sorted(run.client.get_metric_history(run.run_id, "val/accuracy"), key=lambda m: m.step)
    rounds_s = [m.value for m in run.client.get_metric_history(run.run_id, "time/round_s")]
    return out, [(m.step, m.value) for m in hist], time.monotonic() - t0, rounds_s


def _first_reaching(history, target):
    return next((step for step, acc in history if acc >= target), None)


def rounds_to_target(spark, tracking_uri, args) -> dict:
    from sparkml_dist.strategies.federated.config import FederatedConfig
    from sparkml_dist.strategies.federated.partitioner import dirichlet_clients, iid_clients

    raw = spark.read.parquet(args.data)
    out = {}
    for split, df in (("iid", iid_clients(raw, 20, seed=1)),
                      ("dirichlet_0.3", dirichlet_clients(raw, "label", 20, 0.3, seed=1))):
        df = df.cache()
        res = {}
        for name, cfg, fed in (
                ("fedavg", _cfg(tracking_uri, 0.2, 0.5), FederatedConfig(
                    client_col="client", rounds=args.fedavg_max_rounds, local_epochs=5,
                    local_batch_size=16)),
                ("fedsgd", _cfg(tracking_uri, args.fedsgd_lr, 0.0), FederatedConfig(
                    client_col="client", rounds=args.fedsgd_max_rounds, local_steps=1,
                    local_batch_size=100_000, eval_every_rounds=args.fedsgd_eval_every))):
            _, hist, wall, _ = _run(spark, df, cfg, fed)
            reached = _first_reaching(hist, args.target)
            res[name] = {"rounds": reached if reached is not None else fed.rounds,
                         "reached": reached is not None, "best_accuracy": max(a for _, a in hist),
                         "final_accuracy": hist[-1][1], "wall_s": wall,
                         "local": {"epochs": fed.local_epochs, "steps": fed.local_steps,
                                   "batch": fed.local_batch_size, "lr": cfg.optimizer.lr,
                                   "momentum": cfg.optimizer.momentum},
                         "eval_every_rounds": fed.eval_every_rounds}
            logging.info("%s %s: %s", split, name, res[name])
        res["ratio_fedavg_over_fedsgd_rounds"] = res["fedavg"]["rounds"] / res["fedsgd"]["rounds"]
        res["ratio_is_upper_bound"] = not res["fedsgd"]["reached"]
        out[split] = res
        df.unpersist()
    return out


def throughput(spark, tracking_uri, counts: list[int], rows_per_client: int, rounds: int) -> dict:
    from pyspark.sql import functions as F

    from sparkml_dist.strategies.federated.config import FederatedConfig

    out = {}
    for n in counts:
        df = (spark.range(n * rows_per_client)
              .select(F.array(*[F.rand(i).cast("float") for i in range(64)]).alias("features"),
                      (F.col("id") % 10).alias("label"),
                      (F.col("id") % n).cast("int").alias("client"))).cache()
        df.count()
        fed = FederatedConfig(client_col="client", rounds=rounds, local_steps=1,
                              local_batch_size=rows_per_client)
        _, _, wall, rounds_s = _run(spark, df, _cfg(tracking_uri, 0.1, 0.0, 0.0), fed)
        steady = rounds_s[1:]  # the first round starts the Python workers
        out[str(n)] = {"clients": n, "round_s": median(steady),
                       "updates_per_s": n / median(steady), "round_s_all": rounds_s,
                       "wall_s": wall}
        logging.info("throughput %d clients: %s", n, out[str(n)])
        df.unpersist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--fedavg-max-rounds", type=int, default=25)
    ap.add_argument("--fedsgd-max-rounds", type=int, default=150)
    ap.add_argument("--fedsgd-eval-every", type=int, default=5)
    ap.add_argument("--fedsgd-lr", type=float, default=0.5)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rows-per-client", type=int, default=16)
    ap.add_argument("--throughput-rounds", type=int, default=4)
    ap.add_argument("--skip-rounds", action="store_true", help="throughput only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    setup_env()
    spark = spark_session("bench_federated", **{"spark.sql.shuffle.partitions": "4"})
    before = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        from sparkml_dist.datasets import write_digits_parquet

        args.data = str(write_digits_parquet(Path(tmp, "digits.parquet")))
        tracking_uri = f"sqlite:///{tmp}/mlflow.db"
        record = {"config": {k: v for k, v in vars(args).items() if k != "data"},
                  "load_avg_1m_at_start": before["load_avg_1m"]}
        if not args.skip_rounds:
            record["rounds_to_target"] = rounds_to_target(spark, tracking_uri, args)
        record["throughput"] = throughput(spark, tracking_uri, args.clients,
                                          args.rows_per_client, args.throughput_rounds)
    path = write_result("federated", record)
    print(f"wrote {path}")
    spark.stop()


if __name__ == "__main__":
    main()
