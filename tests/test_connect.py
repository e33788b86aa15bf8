"""Training and scoring through Spark Connect.

The fixture starts a Spark Connect server (``SparkConnectServer`` from the PySpark package, whose
jars include ``spark-connect``) on a free loopback port with ``local[2]``, and the tests drive it
from a ``SparkSession.builder.remote(...)`` client: no SparkContext, no JVM on this side.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import sqlite_store
from tests.services import free_port, listening, service

SERVER_START_TIMEOUT_S = 180.0
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
# Set by SparkSession.builder.remote(); left behind they turn every later
# SparkSession.builder.getOrCreate() in this process into a Connect client.
_CONNECT_ENV = ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE")


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory):
    """A Spark Connect server on ``local[2]``; yields ``sc://127.0.0.1:<port>``.

    ``spark.executor.instances``/``cores`` are set (local mode ignores them) so the pre-flight's
    settings-based slot count has something to read.
    """
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    root = tmp_path_factory.mktemp("connect")
    port = free_port()
    log_path = root / "server.log"
    env = dict(os.environ, SPARK_HOME=str(spark_home), SPARK_LOCAL_IP="127.0.0.1",
               PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    for key in _CONNECT_ENV + ("MLFLOW_TRACKING_URI",):
        env.pop(key, None)
    cmd = [str(spark_home / "bin" / "spark-submit"), "--class", SERVER_CLASS,
           "--master", "local[2]", "--name", "sparkml_dist-connect-test",
           "--conf", f"spark.connect.grpc.binding.port={port}",
           "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
           "--conf", "spark.ui.enabled=false",
           "--conf", "spark.sql.shuffle.partitions=4",
           "--conf", "spark.driver.memory=2g",
           "--conf", f"spark.pyspark.python={sys.executable}",
           "--conf", f"spark.local.dir={root / 'local'}",
           "--conf", f"spark.sql.warehouse.dir={root / 'warehouse'}",
           "--conf", "spark.executor.instances=1", "--conf", "spark.executor.cores=1",
           "spark-internal"]
    with service(cmd, log_path, env, root, lambda: listening(port), "Spark Connect server",
                 SERVER_START_TIMEOUT_S):
        yield f"sc://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def remote(connect_server):
    """A Spark Connect client session; the process-wide Connect switch is undone afterwards."""
    from pyspark.sql import SparkSession

    saved = {k: os.environ.get(k) for k in _CONNECT_ENV}
    session = SparkSession.builder.remote(connect_server).getOrCreate()
    yield session
    session.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_session_is_connect(remote):
    from pyspark.sql.utils import is_remote

    assert is_remote()
    assert type(remote).__module__.startswith("pyspark.sql.connect")
    assert remote.range(3).count() == 3


def test_preflight_counts_slots_without_spark_context(remote, monkeypatch, caplog):
    from sparkml_dist.config import BackendConfig
    from sparkml_dist.errors import ClusterError
    from sparkml_dist.spark import preflight

    assert preflight.available_slots(remote) == 2  # local[2], read from the session's conf
    preflight.check_cluster(remote, 2, BackendConfig())

    # A cluster master: no SparkContext on a Connect client, so the count comes from the fixed
    # executor settings (1 instance x 1 core) and a 2-rank job fails before any stage runs.
    monkeypatch.setattr(preflight, "local_slots", lambda master, task_cpus: None)
    assert preflight.available_slots(remote) == 1
    with pytest.raises(ClusterError, match="needs 2 task slots at once, but the cluster has 1"):
        preflight.check_cluster(remote, 2, BackendConfig(), wait_s=0)

    # Nothing to count from: a warning, and the job is left to Spark's own barrier check.
    monkeypatch.setattr(preflight, "configured_slots", lambda spark, task_cpus: None)
    assert preflight.available_slots(remote) is None
    with caplog.at_level(logging.WARNING, logger=preflight.__name__):
        preflight.check_cluster(remote, 2, BackendConfig(), wait_s=0)
    assert "cannot count task slots" in caplog.text


def test_fit_and_score_through_connect(remote, digits_path, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient
    from pyspark.sql import functions as F

    from sparkml_dist import fit
    from sparkml_dist.inference import load_torch_model, predict_udf, register_predict_udf

    tracking_uri = sqlite_store(tmp_path / "mlflow.db")
    df = remote.read.parquet(str(digits_path)).limit(400)
    res = fit(df, **{"data.features_col": "features", "training.epochs": 2,
                     "training.num_workers": 2, "tracking.tracking_uri": tracking_uri,
                     "tracking.experiment": "connect", "tracking.progress": False})
    client = MlflowClient(tracking_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and res.attempts == 1
    assert run.data.tags["spark.app_id"].startswith("local-")  # read over Connect
    assert len(client.get_metric_history(res.run_id, "val/accuracy")) == 2
    assert res.model_uri

    # Score through the same Connect session with the UDF, and compare with the model run here.
    predict = predict_udf(res.model_uri, tracking_uri=tracking_uri)
    rows = (df.withColumn("row", F.monotonically_increasing_id())
            .select("row", "features", "label", predict("features").alias("p"))
            .orderBy("row").limit(50).collect())
    assert len(rows) == 50
    probs = np.asarray([r["p"]["probability"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    model = load_torch_model(predict.spec.location, tracking_uri)
    x = np.asarray([r["features"] for r in rows], dtype=np.float32)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert [r["p"]["prediction"] for r in rows] == expected.argmax(axis=1).tolist()

    register_predict_udf(remote, "predict_digit", res.model_uri, tracking_uri=tracking_uri)
    df.createOrReplaceTempView("digits")
    counted = remote.sql("SELECT predict_digit(features).prediction AS p, count(*) AS n "
                         "FROM digits GROUP BY 1").collect()
    assert sum(r["n"] for r in counted) == 400
    assert {r["p"] for r in counted} <= set(range(10))

