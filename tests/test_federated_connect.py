"""Federated rounds through Spark Connect: no SparkContext, so the global model travels in the
task closure instead of a broadcast; secure aggregation's small stages go through
``createDataFrame`` + ``mapInArrow``, the clients through ``groupBy().applyInArrow``."""

from __future__ import annotations

import numpy as np

from sparkml_dist.config import DataConfig, JobConfig, OptimizerConfig, TrackingConfig
from sparkml_dist.strategies.federated.config import FederatedConfig, SecureAggregationConfig
from sparkml_dist.strategies.federated.driver import fit_federated
from sparkml_dist.strategies.federated.partitioner import iid_clients
from sparkml_dist.tracking.run import JobRun
from tests.conftest import sqlite_store
from tests.test_connect import connect_server, remote  # noqa: F401 - the Connect fixtures


def test_federated_rounds_with_secure_aggregation_through_connect(remote, digits_path,  # noqa: F811
                                                                   tmp_path):
    from pyspark.sql.utils import is_remote

    assert is_remote()
    cfg = JobConfig(data=DataConfig(features_col="features"),
                    optimizer=OptimizerConfig(name="sgd", lr=0.2, momentum=0.5),
                    tracking=TrackingConfig(tracking_uri=sqlite_store(tmp_path / "mlflow.db"),
                                            log_model=False, progress=False))
    fed = FederatedConfig(client_col="client", rounds=2, local_epochs=2, local_batch_size=16,
                          simulate_dropout=0.2, secure_aggregation=SecureAggregationConfig())
    run = JobRun(cfg)
    out = fit_federated(remote, iid_clients(remote.read.parquet(str(digits_path)), 10, seed=1),
                        cfg, run, fed)
    run.finish()
    answered = [m.value for m in run.client.get_metric_history(run.run_id,
                                                               "fed/clients_answered")]
    accuracy = sorted(run.client.get_metric_history(run.run_id, "val/accuracy"),
                      key=lambda m: m.step)
    assert out["rounds"] == 2 and answered == [8.0, 8.0]
    assert np.isfinite(out["weights"].numpy()).all()
    assert accuracy[-1].value > accuracy[0].value > 0.2  # it learns through Connect
