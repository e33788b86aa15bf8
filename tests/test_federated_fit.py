"""``strategy.kind: federated`` through the public entry point: ``fit`` with a YAML config runs
the rounds on the driver into one MLflow run, like any other job."""

from pathlib import Path

from mlflow.tracking import MlflowClient

from sparkml_dist import final_state, fit, load_config
from sparkml_dist.strategies.federated.partitioner import iid_clients

ROOT = Path(__file__).resolve().parents[1]


def test_fit_runs_a_federated_job_from_the_shipped_config(spark, digits_path, tracking_uri):
    df = iid_clients(spark.read.parquet(str(digits_path)), 20, seed=1)
    cfg = load_config(ROOT / "conf/digits_federated.yaml", [
        f"tracking.tracking_uri={tracking_uri}", "strategy.rounds=4", "tracking.progress=false"])
    result = fit(df, cfg)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.kind"] == "federated"
    assert run.data.params["strategy.client_col"] == "client"
    assert run.data.tags["sparkml_dist.strategy"] == "federated"
    assert result.metrics["val/accuracy"] >= 0.85, result.metrics
    acc = MlflowClient(tracking_uri).get_metric_history(result.run_id, "val/accuracy")
    assert len(acc) == 4  # one evaluation per round
    assert final_state(result.run_id, tracking_uri).keys()
    # The logged model carries the metrics of the last round (step 4), its weights' round.
    model_id = result.model_uri.removeprefix("models:/").split("/")[0]
    linked = {m.key: m for m in MlflowClient(tracking_uri).get_logged_model(model_id).metrics
              or []}
    assert "val/accuracy" in linked and linked["val/accuracy"].step == 4, linked
    assert linked["val/accuracy"].value == max(acc, key=lambda m: m.step).value
