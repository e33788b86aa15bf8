"""Shared fixtures: one Spark session per test module (JVM start is slow), a fresh MLflow store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


_OVERRIDDEN: set[str] = set()


def make_session(master: str = "local[2]", app: str = "sparkml_dist-tests", **conf: str):
    """A classic SparkSession sized for the 2-core test machine.

    Settings a module passes in ``conf`` end with its session: Spark copies a session's conf
    into the JVM's system properties, which the next session in this process would inherit
    (a module's network encryption would reach every later module), so they are cleared first.
    """
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    if SparkContext._jvm is not None:
        for key in _OVERRIDDEN - set(conf):
            SparkContext._jvm.System.clearProperty(key)
    _OVERRIDDEN.update(conf)

    builder = (SparkSession.builder.master(master).appName(app)
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.default.parallelism", "4")
               .config("spark.pyspark.python", sys.executable)
               .config("spark.driver.memory", "2g"))
    for k, v in conf.items():
        builder = builder.config(k, v)
    return builder.getOrCreate()


@pytest.fixture(autouse=True, scope="module")
def _isolated_mlflow_globals():
    """Undo what a module did to MLflow's process-global tracking URI (``set_tracking_uri`` also
    sets ``MLFLOW_TRACKING_URI``, which later subprocesses would inherit)."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(uri)
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env


@pytest.fixture(scope="module")
def spark(request):
    """Module-scoped session; a module may set ``SPARK_MASTER = "local[3]"`` and
    ``SPARK_CONF = {key: value}`` (settings that end with its session)."""
    master = getattr(request.module, "SPARK_MASTER", "local[2]")
    session = make_session(master, **getattr(request.module, "SPARK_CONF", {}))
    yield session
    session.stop()


@pytest.fixture(scope="module")
def digits_path(tmp_path_factory) -> Path:
    from sparkml_dist.datasets import write_digits_parquet

    return write_digits_parquet(tmp_path_factory.mktemp("data") / "digits.parquet")


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh embedded MLflow store (SQLite + local artifacts) per test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
