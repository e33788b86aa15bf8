"""A parameter-server job on a session that encrypts its traffic: the servers' wire is
authenticated but not encrypted, so the job is refused before its MLflow run starts unless
``backend.allow_unencrypted`` is true."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist import fit, load_config
from sparkml_dist.errors import ConfigError
from sparkml_dist.strategies.parameter_server.driver import check_before_run

ROOT = Path(__file__).resolve().parents[1]
SPARK_CONF = {"spark.authenticate": "true", "spark.network.crypto.enabled": "true"}


def test_an_encrypted_cluster_refuses_a_parameter_server_job(spark, digits_path, tracking_uri):
    cfg = load_config(ROOT / "conf/parameter_server.yaml", [
        f"tracking.tracking_uri={tracking_uri}", "tracking.progress=false"])
    df = spark.read.parquet(str(digits_path))
    with pytest.raises(ConfigError, match=r"spark\.network\.crypto\.enabled=true.*"
                                          r"parameter_server.*unencrypted.*"
                                          r"backend\.allow_unencrypted=true"):
        fit(df, cfg)
    client = MlflowClient(tracking_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    # with the opt-in the same session passes the check (a warning is logged)
    allowed = cfg.replace(**{"backend.allow_unencrypted": True})
    check_before_run(spark, allowed, lambda key: spark.conf.get(key, "") or "")
