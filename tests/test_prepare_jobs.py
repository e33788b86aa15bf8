"""How often ``fit`` reads its data: the source at most twice, nothing after training.

The source rows come out of a pandas UDF that adds its batch sizes to a Spark accumulator, so
every computation of the source (whole or partial) is counted in rows. The status tracker lists
the Spark jobs the call ran (a job group set on this thread).
"""

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F

import sparkml_dist.api as api
from sparkml_dist import JobConfig, fit

ROWS = 480


@pytest.fixture
def counted_source(spark):
    acc = spark.sparkContext.accumulator(0)

    @F.pandas_udf("long")
    def tick(ids: pd.Series) -> pd.Series:
        acc.add(len(ids))
        return ids

    ids = spark.range(0, ROWS, numPartitions=2).select(tick("id").alias("id"))
    df = ids.select((F.sin("id") + (F.col("id") % 3)).alias("x1"), F.cos("id").alias("x2"),
                    (F.col("id") % 3).cast("int").alias("label"))
    return df, acc


def test_fit_reads_the_source_twice_and_nothing_after_training(spark, counted_source,
                                                                tracking_uri, monkeypatch):
    df, acc = counted_source
    tracker = spark.sparkContext.statusTracker()
    at_model_logging = []
    log_final_model = api._log_final_model

    def spy(*args, **kwargs):  # the real function, noting which jobs had run by then
        at_model_logging.append(set(tracker.getJobIdsForGroup("fit-under-test")))
        return log_final_model(*args, **kwargs)

    monkeypatch.setattr(api, "_log_final_model", spy)
    cfg = JobConfig().replace(**{
        "data.feature_cols": ("x1", "x2"), "data.val_fraction": 0.25,
        "model.factory": "sparkml_dist.models:mlp", "model.kwargs": {"hidden": [8]},
        "training.num_workers": 2, "training.batch_size": 32, "training.epochs": 1,
        "fault.max_restarts": 0, "tracking.tracking_uri": tracking_uri,
        "tracking.log_model": True, "tracking.progress": False})
    spark.sparkContext.setJobGroup("fit-under-test", "fit under test")
    try:
        result = fit(df, cfg)
    finally:
        spark.sparkContext.setJobGroup("other", "after the test")
    assert result.model_uri is not None and at_model_logging
    jobs = set(tracker.getJobIdsForGroup("fit-under-test"))
    assert jobs, "the status tracker saw no job of the fit call"
    assert jobs == at_model_logging[0], (
        f"jobs {sorted(jobs - at_model_logging[0])} ran after training")
    # One aggregate pass, one pass to number and store the shards; nothing else touches it.
    assert acc.value == 2 * ROWS, f"the source was computed for {acc.value} rows ({ROWS} rows)"
    client = MlflowClient(tracking_uri)
    metrics = client.get_run(result.run_id).data.metrics
    # The logged model carries the metrics of the step its weights are from: the last one.
    steps = result.ranks[0]["steps_done"]
    model_id = result.model_uri.removeprefix("models:/").split("/")[0]
    linked = {m.key: m for m in client.get_logged_model(model_id).metrics or []}
    assert linked["val/accuracy"].step == steps, (steps, linked)
    assert linked["val/accuracy"].value == metrics["val/accuracy"]
    for key in ("time/prepare_s", "time/prepare_assemble_s", "time/prepare_shard_s",
                "time/finish_s"):
        assert 0 < metrics[key] < 600, (key, metrics.get(key))
    # The stored shards are released once the job ends.
    assert spark._jsparkSession.sharedState().cacheManager().isEmpty()
