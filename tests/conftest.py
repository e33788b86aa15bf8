"""Shared fixtures: one Spark session per test module (JVM start is slow), a fresh MLflow store."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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


_STORE_TEMPLATE: Path | None = None


def sqlite_store(db: Path) -> str:
    """The URI of a new, empty MLflow SQLite store at ``db``.

    MLflow builds a new file's schema with its migrations (about 2 s, paid by the first process
    that opens it); this process runs them once, into a template, and each store starts as a copy
    of it: the same tables and Default experiment MLflow would create, in a file of its own.
    """
    global _STORE_TEMPLATE
    if _STORE_TEMPLATE is None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        template = Path(tempfile.mkdtemp(prefix="sparkml_dist-store-")) / "mlflow.db"
        store = SqlAlchemyStore(f"sqlite:///{template}", str(template.parent / "mlruns"))
        store.engine.dispose()
        _STORE_TEMPLATE = template
    db.parent.mkdir(parents=True, exist_ok=True)
    if db.exists():
        raise FileExistsError(f"{db} exists: a new store needs a path of its own")
    shutil.copyfile(_STORE_TEMPLATE, db)
    return f"sqlite:///{db}"


def pytest_sessionfinish(session, exitstatus):
    if _STORE_TEMPLATE is not None:
        shutil.rmtree(_STORE_TEMPLATE.parent, ignore_errors=True)


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A new embedded MLflow store (SQLite + local artifacts) per test."""
    return sqlite_store(tmp_path / "mlflow.db")
