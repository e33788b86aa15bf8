"""End to end on a standalone Spark cluster (a master and two workers on loopback): ranks live in
separate executors, and a job survives an executor killed from outside."""

import threading
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist import final_state, fit
from tests.cluster import StandaloneCluster, mlflow_server
from tests.test_fault_tolerance import assert_bitwise_equal, ft_config

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster_spark(tmp_path_factory):
    cluster = StandaloneCluster(tmp_path_factory.mktemp("standalone"), workers=2)
    spark = cluster.session()
    yield cluster, spark
    spark.stop()
    cluster.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Executors track through a server, as on a cluster whose nodes share no disk."""
    with mlflow_server(tmp_path_factory.mktemp("cluster_server")) as (url, _):
        yield url


def cfg_for(uri, experiment):
    return ft_config(uri, **{"tracking.experiment": experiment,
                             "model.factory": "tests.factories:slow_mlp",
                             "model.kwargs": {"hidden": [64], "dropout": 0.1, "delay_s": 0.1},
                             "backend.rendezvous_timeout_s": 60.0})


@pytest.fixture(scope="module")
def reference(cluster_spark, digits_path, server):
    _, spark = cluster_spark
    uri = server
    result = fit(spark.read.parquet(str(digits_path)), cfg_for(uri, "cluster-reference"))
    return result, final_state(result.run_id, uri)


def test_ranks_run_in_separate_executors(reference):
    result, _ = reference
    assert result.attempts == 1
    executors = {r["executor"] for r in result.ranks}
    assert len(executors) == 2, executors
    assert result.metrics["val/accuracy"] > 0.8


def _executor_pids(app_id: str) -> list[int]:
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "CoarseGrainedExecutorBackend" in cmd and app_id in cmd:
            pids.append(p.info["pid"])
    return pids


def test_executor_killed_from_outside_is_survived_exactly(cluster_spark, digits_path, server,
                                                          reference):
    _, spark = cluster_spark
    uri = server
    app_id = spark.conf.get("spark.app.id")
    client = MlflowClient(uri)
    box = {}
    cfg = cfg_for(uri, "cluster-kill")
    t = threading.Thread(target=lambda: box.setdefault(
        "result", fit(spark.read.parquet(str(digits_path)), cfg)), daemon=True)
    t.start()
    killed = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and t.is_alive() and killed is None:
        time.sleep(0.5)
        try:
            (run,) = client.search_runs(
                [client.get_experiment_by_name("cluster-kill").experiment_id])
        except Exception:  # noqa: BLE001 - the run does not exist yet
            continue
        if client.list_artifacts(run.info.run_id, "checkpoints"):
            pids = _executor_pids(app_id)
            assert len(pids) == 2, pids
            psutil.Process(pids[1]).kill()  # SIGKILL an executor JVM mid-training
            killed = pids[1]
    assert killed is not None, "training ended before an executor could be killed"
    t.join(timeout=600)
    result = box["result"]
    assert result.attempts >= 2
    run = client.get_run(result.run_id)
    assert "sparkml_dist.failure.0" in run.data.tags
    assert result.ranks[0]["resumed_from"] >= 10
    assert_bitwise_equal(final_state(result.run_id, uri), reference[1])
