"""A job on a cluster whose executors have none of the project's packages: the environment travels
with ``spark-submit --archives``, the run is tracked by an ``mlflow server`` over HTTP with
proxied artifacts, and what is missing or different fails before training with the fix named.

The workers run with a bare venv first on their ``PATH`` and their own working directories; the
driver is ``spark-submit`` started in a directory outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import re
import sys
import tarfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist import final_state
from tests.cluster import ROOT, StandaloneCluster, bare_venv, mlflow_server
from tests.test_fault_tolerance import assert_bitwise_equal

pytestmark = pytest.mark.cluster

SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"
PACK_TIMEOUT_S = 1800  # the first pack installs and compresses the environment (minutes)
PROBE_S = 60.0  # the pre-flight's own time, to its error (archive unpacking included)
# The whole failed job: JVM start, the driver unpacking and deleting its copy of the archive
# (spark-submit does that in client mode). A retried or hanging probe would take longer: its own
# bound is 180 s, Spark's wait for barrier slots 10 min.
FAIL_WITHIN_S = 300.0


@pytest.fixture(scope="module")
def packed_env() -> Path:
    """The executors' environment, built by the same script as ``make dist`` (cached)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pack_env.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=PACK_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def driver_site(packed_env, tmp_path_factory) -> Path:
    """The archive's own copy of ``sparkml_dist``, for the driver's ``PYTHONPATH``: driver and
    executors then run the same code, as when both install one wheel, even while the checkout
    changes under the test."""
    site = tmp_path_factory.mktemp("driver_site")
    marker = "/site-packages/sparkml_dist/"
    with tarfile.open(packed_env, "r|gz") as tar:
        for member in tar:
            if marker in f"/{member.name}" and member.isfile():
                target = site / "sparkml_dist" / member.name.split(marker.lstrip("/"), 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    assert (site / "sparkml_dist" / "__init__.py").is_file()
    return site


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    venv = bare_venv(tmp_path_factory.mktemp("bare") / "venv")
    # The premise: this Python has none of the project's packages.
    probe = subprocess.run([str(venv / "bin" / "python3"), "-c", "import torch"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    return venv


@pytest.fixture(scope="module")
def cluster(bare, tmp_path_factory):
    cluster = StandaloneCluster(tmp_path_factory.mktemp("bare_cluster"), workers=2,
                                worker_python=bare)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("shipping_server")) as url_and_artifacts:
        yield url_and_artifacts


def submit(cluster: StandaloneCluster, cwd: Path, sets: list[str], archive: Path | None = None,
           pythonpath: Path | None = None, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``spark-submit jobs/train.py`` in client mode from ``cwd``, as the README shows."""
    cmd = [str(SPARK_SUBMIT), "--master", cluster.url, "--conf", "spark.executor.cores=1",
           "--conf", "spark.cores.max=2", "--conf", "spark.executor.memory=1g",
           "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.ui.enabled=false",
           "--conf", "spark.log.level=WARN"]
    if archive is not None:
        cmd += ["--archives", f"{archive}#environment",
                "--conf", "spark.pyspark.python=./environment/bin/python",
                "--conf", f"spark.pyspark.driver.python={sys.executable}"]
    cmd += [str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "conf" / "digits.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYSPARK_PYTHON", "PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    (cwd / "stdout.log").write_text(proc.stdout)
    (cwd / "stderr.log").write_text(proc.stderr)
    return proc


def output(proc: subprocess.CompletedProcess) -> str:
    """What the job printed: spark-submit merges the Python driver's stderr into its stdout."""
    return proc.stdout + proc.stderr


def _tail(proc: subprocess.CompletedProcess) -> str:
    """Our own lines (errors, pre-flight, attempts) and the end of the driver's log."""
    ours = [line for line in output(proc).splitlines()
            if line.startswith("error:") or " sparkml_dist." in line]
    return "\n".join(ours[-40:]) + "\n...\n" + proc.stderr[-2000:]


def job_sets(digits_path: Path, url: str, experiment: str) -> list[str]:
    return [f"data.source={digits_path}", f"tracking.tracking_uri={url}",
            f"tracking.experiment={experiment}", "tracking.progress=false",
            "fault.backoff_s=0", "backend.rendezvous_timeout_s=120"]


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, _tail(proc)
    lines = proc.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")  # jobs/train.py's JSON summary
    return json.JSONDecoder().raw_decode("\n".join(lines[start:]))[0]


@pytest.fixture(scope="module")
def shipped_run(cluster, server, packed_env, driver_site, digits_path, tmp_path_factory):
    url, _ = server
    proc = submit(cluster, tmp_path_factory.mktemp("job"),
                  job_sets(digits_path, url, "shipped"), archive=packed_env,
                  pythonpath=driver_site)
    return result_of(proc)


def test_shipped_environment_trains_into_the_tracking_server(shipped_run, server):
    url, artifacts = server
    assert shipped_run["attempts"] == 1
    assert shipped_run["metrics"]["val/accuracy"] >= 0.95, shipped_run["metrics"]
    client = MlflowClient(url)
    run = client.get_run(shipped_run["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) > 10
    assert client.list_artifacts(run.info.run_id, "checkpoints")
    # Proxied: the bytes rank 0 uploaded from an executor sit in the server's own store.
    exp_dir = artifacts / run.info.experiment_id / run.info.run_id / "artifacts" / "checkpoints"
    assert any(p.suffix == ".pt" for p in exp_dir.rglob("*")), exp_dir
    assert shipped_run["model_uri"]
    import mlflow.pyfunc

    mlflow.set_tracking_uri(url)
    model = mlflow.pyfunc.load_model(shipped_run["model_uri"])
    assert model.metadata is not None


def test_lost_rank_resumes_bitwise_equal_in_the_shipped_setup(cluster, server, packed_env,
                                                              driver_site, digits_path,
                                                              shipped_run, tmp_path):
    url, _ = server
    sets = job_sets(digits_path, url, "shipped-resume") + [
        "fault.inject={rank: 1, step: 120, attempt: 0}"]
    result = result_of(submit(cluster, tmp_path / "job", sets, archive=packed_env,
                              pythonpath=driver_site))
    assert result["attempts"] == 2
    run = MlflowClient(url).get_run(result["run_id"])
    assert run.data.tags["sparkml_dist.failure.0"].startswith("worker_lost")
    assert_bitwise_equal(final_state(result["run_id"], url),
                         final_state(shipped_run["run_id"], url))


def _assert_failed_fast(proc: subprocess.CompletedProcess, elapsed_s: float, *needles: str,
                        probed: bool = True):
    assert proc.returncode == 2, (proc.returncode, _tail(proc))
    assert elapsed_s < FAIL_WITHIN_S, f"took {elapsed_s:.0f} s"
    probe = re.search(r"pre-flight on executors \(([0-9.]+) s\)", output(proc))
    assert bool(probe) == probed, _tail(proc)
    if probe:
        assert float(probe.group(1)) < PROBE_S, probe.group(0)
    for needle in needles:
        assert needle in output(proc), _tail(proc)
    assert "launching attempt" not in output(proc)  # failed before any barrier stage of training
    assert "Lost task" not in output(proc)  # the probe's tasks report, they do not fail


def test_without_the_archive_the_preflight_names_what_is_missing(cluster, server, digits_path,
                                                                tmp_path):
    url, _ = server
    started = time.monotonic()
    proc = submit(cluster, tmp_path / "job", job_sets(digits_path, url, "no-archive"))
    _assert_failed_fast(proc, time.monotonic() - started,
                        "executor on ", "torch missing", "mlflow missing", "sparkml_dist missing",
                        "--archives dist/sparkml_dist-env.tar.gz#environment")
    client = MlflowClient(url)
    assert client.get_experiment_by_name("no-archive") is None  # no run was created


def test_a_version_mismatch_between_driver_and_executors_fails_fast(cluster, server, packed_env,
                                                                   driver_site, digits_path,
                                                                   tmp_path):
    url, _ = server
    # The driver imports a copy of the archive's package with another version number.
    copy = tmp_path / "driver_site" / "sparkml_dist"
    shutil.copytree(driver_site / "sparkml_dist", copy)
    init = copy / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.1.1"'))
    started = time.monotonic()
    proc = submit(cluster, tmp_path / "job", job_sets(digits_path, url, "mismatch"),
                  archive=packed_env, pythonpath=copy.parent)
    _assert_failed_fast(proc, time.monotonic() - started,
                        "sparkml_dist 0.1.0 (driver: 0.1.1)")


def test_a_local_tracking_store_under_a_cluster_master_fails_before_launch(cluster, digits_path,
                                                                          tmp_path):
    # No tracking URI anywhere: the default is a SQLite file in the driver's working directory.
    started = time.monotonic()
    sets = [s for s in job_sets(digits_path, "", "x") if not s.startswith("tracking.tracking_uri")]
    proc = submit(cluster, tmp_path / "job", sets)
    _assert_failed_fast(proc, time.monotonic() - started,
                        f"the tracking store sqlite:///{tmp_path / 'job' / 'mlflow.db'} is a path "
                        "on the driver's disk", "mlflow server", "--serve-artifacts",
                        "MLFLOW_TRACKING_URI", "tracking.shared_storage=true", probed=False)
    assert "pre-flight on executors" not in output(proc)  # nothing ran on executors
