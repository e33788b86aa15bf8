"""A parameter-server worker is an ordinary Spark task: when its process dies, Spark retries that
task alone (``local[2,2]``: two attempts per task), the retry asks the servers where the worker
was and continues from that step, and the job ends with the single-process reference's model."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist import final_state, fit
from sparkml_dist.config import FaultInjection
from tests.ranks import reference_weights
from tests.test_parameter_server_spark import config, prepared_shards

SPARK_MASTER = "local[2,2]"


@pytest.fixture(scope="module")
def df(spark, digits_path):
    return spark.read.parquet(str(digits_path))


def test_a_killed_worker_task_is_retried_alone_and_resumes_at_its_step(spark, df, tracking_uri):
    cfg = config(tracking_uri, "strategy.mode=sync", "strategy.num_servers=2",
                 "training.epochs=1", "tracking.log_model=false")
    result = fit(df, cfg.replace(**{"fault.inject": FaultInjection(rank=1, step=30)}))
    assert MlflowClient(tracking_uri).get_run(result.run_id).info.status == "FINISHED"
    ranks = {r["worker"]: r for r in result.ranks}
    assert ranks[0]["attempt"] == 0 and ranks[0]["start_step"] == 0  # never restarted
    assert ranks[1]["attempt"] == 1 and ranks[1]["start_step"] == 30  # resumed, not replayed
    assert ranks[1]["steps"] == ranks[0]["steps"] - 30
    ref = reference_weights(cfg, prepared_shards(spark, df, cfg))
    got = final_state(result.run_id, tracking_uri)
    for name, value in ref.items():
        assert (got[name] - value).abs().max().item() <= 1e-5, name
