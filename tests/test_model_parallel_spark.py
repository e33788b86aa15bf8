"""Model parallelism through ``fit`` on local Spark with the shipped ``conf/model_parallel.yaml``:
a two-stage 1F1B pipeline where only the first stage's partition holds rows, one MLflow run with
the mesh and bubble recorded, and the logged model equal to the stages' parts put together."""

from pathlib import Path

import pytest
import torch

from sparkml_dist.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_pipeline_job_through_fit_on_local_spark(spark, digits_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    from sparkml_dist import final_state, fit
    from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore
    from sparkml_dist.training.checkpoint import load_part, part_file

    df = spark.read.parquet(str(digits_path)).limit(800)
    result = fit(df, load_config(ROOT / "conf/model_parallel.yaml", [
        f"tracking.tracking_uri={tracking_uri}", "training.epochs=3", "tracking.progress=false",
        "checkpoint.every_steps=10"]))
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["sparkml_dist.strategy"] == "model_parallel"
    assert run.data.tags["sparkml_dist.resume_guarantee"] == "bitwise"
    assert run.data.tags["sparkml_dist.model_parallel.mesh"] == "1x2x1"
    assert float(run.data.tags["sparkml_dist.model_parallel.ideal_bubble"]) == pytest.approx(0.2)
    idle = client.get_metric_history(result.run_id, "pipeline/idle_share_stage1")
    assert idle and all(0 <= m.value < 1 for m in idle)
    assert result.metrics["val/accuracy"] > 0.5
    assert result.model_uri is not None
    store = MlflowCheckpointStore(tracking_uri, result.run_id)
    name = store.complete_names()[0]
    meta = store.read_meta(name)
    stages = [load_part(store, name, meta, part_file(r))["model"] for r in range(2)]
    assert set(stages[0]).isdisjoint(stages[1]) and "input.0.weight" in stages[0] \
        and "head.weight" in stages[1]
    whole = final_state(result.run_id, tracking_uri)
    assert set(whole) == set(stages[0]) | set(stages[1])
    for k, v in whole.items():
        assert torch.equal(v, (stages[0] if k in stages[0] else stages[1])[k]), k
