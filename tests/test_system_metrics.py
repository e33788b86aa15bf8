"""``tracking.system_metrics_interval_s``: every rank logs MLflow system metrics into the job's
run as its own node (real local Spark, real MLflow store)."""

import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist import JobConfig, fit
from sparkml_dist.errors import ConfigError


def test_interval_must_be_positive():
    with pytest.raises(ConfigError, match="system_metrics_interval_s"):
        JobConfig().replace(**{"tracking.system_metrics_interval_s": 0})


def test_every_rank_logs_system_metrics_as_its_own_node(spark, digits_path, tracking_uri):
    df = spark.read.parquet(str(digits_path)).limit(400)
    cfg = JobConfig().replace(**{
        "data.features_col": "features", "model.factory": "tests.factories:slow_mlp",
        "model.kwargs": {"delay_s": 0.4}, "training.num_workers": 2, "training.batch_size": 32,
        "training.epochs": 1, "tracking.tracking_uri": tracking_uri, "tracking.progress": False,
        "tracking.log_model": False, "tracking.system_metrics_interval_s": 0.5,
        "fault.max_restarts": 0})
    result = fit(df, cfg)  # 5 steps per rank at >= 0.4 s each: several 0.5 s samples
    keys = set(MlflowClient(tracking_uri).get_run(result.run_id).data.metrics)
    for rank in (0, 1):
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes",
                     "network_receive_megabytes"):
            assert f"system/rank_{rank}/{name}" in keys, sorted(k for k in keys
                                                                 if k.startswith("system/"))
    assert not [k for k in keys if k.startswith("system/rank_2/")]
