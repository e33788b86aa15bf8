"""End-to-end training on real local Spark with a real MLflow store."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist import JobConfig, fit
from sparkml_dist.datasets import write_digits_parquet
from sparkml_dist.errors import ClusterError, UserCodeError

ROOT = Path(__file__).resolve().parents[1]


def spark_submit() -> str:
    return str(Path(sys.executable).parent / "spark-submit")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo command, run as a real spark-submit job in a scratch directory."""
    work = tmp_path_factory.mktemp("demo")
    write_digits_parquet(work / "data" / "digits.parquet")
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    env.pop("MLFLOW_TRACKING_URI", None)  # the demo uses the default embedded store
    proc = subprocess.run(
        [spark_submit(), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
         str(ROOT / "jobs/train.py"), "--config", str(ROOT / "conf/digits.yaml")],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, proc.stdout


def summary_of(out: str) -> dict:
    """The JSON block jobs/train.py prints before its 'MLflow run:' line."""
    return json.loads(out[out.index('{\n  "run_id"'):out.index("\nMLflow run:")])


def test_demo_reaches_95_percent_and_prints_how_to_open_the_run(demo_run):
    work, out = demo_run
    summary = summary_of(out)
    assert summary["metrics"]["val/accuracy"] >= 0.95, summary["metrics"]
    assert f"MLflow run: {summary['run_id']}" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "#/experiments/" in out


def test_mlflow_run_holds_params_metrics_tags_and_a_loadable_model(demo_run):
    work, out = demo_run
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = summary_of(out)["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["training.num_workers"] == "2" and p["model.factory"] == "sparkml_dist.models:mlp"
    assert p["data.rows_train"] == "1438" and p["data.in_features"] == "64"
    t = run.data.tags
    assert t["sparkml_dist.backend"] == "torch" and t["sparkml_dist.world_size"] == "2"
    assert t["spark.app_id"].startswith("local-")
    loss = client.get_metric_history(run_id, "train/loss")
    acc = client.get_metric_history(run_id, "val/accuracy")
    assert len(loss) >= 20 and len(acc) == 20  # every log window, every epoch
    assert loss[-1].value < loss[0].value
    for key in ("perf/samples_per_s", "time/step_s", "time/feed_s", "time/validate_s",
                "checkpoint/write_s"):
        assert client.get_metric_history(run_id, key), key
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoints", "plots", "config"} <= arts
    ckpts = client.list_artifacts(run_id, "checkpoints")
    assert len(ckpts) == 2  # checkpoint.keep_last
    mlflow.set_tracking_uri(uri)
    model_uri = summary_of(out)["model_uri"]
    model = mlflow.pyfunc.load_model(model_uri)
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    assert np.asarray(model.predict(x)).shape == (4, 10)


@pytest.fixture(scope="module")
def digits_df(spark, digits_path):
    return spark.read.parquet(str(digits_path)).limit(400)


def test_too_few_slots_fails_within_seconds_naming_the_setting(digits_df, tracking_uri):
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"training.num_workers=3 needs 3 task slots at once, "
                                           r"but the cluster has 2 \(spark.master=local\[2\]"):
        fit(digits_df, **{"data.features_col": "features", "training.num_workers": 3,
                          "tracking.tracking_uri": tracking_uri})
    assert time.monotonic() - t0 < 10


def test_deterministic_user_error_stops_after_one_attempt(digits_df, tracking_uri):
    cfg = JobConfig().replace(**{
        "data.features_col": "features", "model.factory": "sparkml_dist.models:mlp",
        "training.epochs": 1, "fault.max_restarts": 3, "fault.backoff_s": 0.0,
        "tracking.tracking_uri": tracking_uri, "tracking.progress": False})
    # A model whose first layer expects 10 features, fed 64: a shape error on every attempt.
    cfg = cfg.replace(**{"model.factory": "tests.factories:wrong_width"})
    with pytest.raises(UserCodeError, match=r"(?s)stopped after attempt 0.*mat1 and mat2 shapes "
                                            r"cannot be multiplied"):
        fit(digits_df, cfg)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sparkml_dist").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["sparkml_dist.attempts"] == "1"
    assert "sparkml_dist.failure.0" in run.data.tags
