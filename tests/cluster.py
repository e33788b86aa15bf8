"""A Spark standalone cluster (one master, N workers) started on loopback for tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyspark

from tests.services import free_port, service, stop_group

SPARK_HOME = Path(pyspark.__file__).parent
ROOT = Path(__file__).resolve().parents[1]


def bare_venv(path: Path) -> Path:
    """A venv with no packages at all (not even pip), made from the base interpreter: what an
    executor host without this project's environment has."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    return path


class StandaloneCluster:
    """Master and workers as child processes; ``stop()`` kills exactly those processes."""

    def __init__(self, workdir: Path, workers: int = 2, cores: int = 1, memory: str = "1g",
                 worker_python: Path | None = None) -> None:
        """``worker_python``: a venv (see :func:`bare_venv`) whose ``bin`` goes first on the
        workers' ``PATH``, so executors run its ``python3`` unless a job names another; the
        workers then also drop this process's Python settings and run in ``workdir``. By
        default the workers use this test's own Python."""
        self.workdir = workdir
        self.port, self.ui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        env = dict(os.environ, SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1",
                   PYSPARK_PYTHON=sys.executable, SPARK_NO_DAEMONIZE="1")
        if worker_python is not None:
            for key in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH", "VIRTUAL_ENV",
                        "MLFLOW_TRACKING_URI"):
                env.pop(key, None)
            env["PATH"] = f"{worker_python / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        spark_class = str(SPARK_HOME / "bin" / "spark-class")
        self.procs: list[subprocess.Popen] = []
        log = open(workdir / "master.log", "w")
        self.procs.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(self.port), "--webui-port", str(self.ui_port)],
            env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        self._wait(lambda s: s.get("status") == "ALIVE", "master")
        for i in range(workers):
            wdir = workdir / f"worker{i}"
            wdir.mkdir(exist_ok=True)
            wlog = open(workdir / f"worker{i}.log", "w")
            self.procs.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                 "--cores", str(cores), "--memory", memory, "--webui-port", "0",
                 "--work-dir", str(wdir), self.url],
                env=env, cwd=wdir, stdout=wlog, stderr=subprocess.STDOUT, start_new_session=True))
        self._wait(lambda s: len([w for w in s.get("workers", []) if w["state"] == "ALIVE"])
                   >= workers, f"{workers} workers")

    def state(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=5) as r:
            return json.load(r)

    def _wait(self, ready, what: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if ready(self.state()):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"standalone cluster: {what} not up within {timeout_s}s; see "
                           f"{self.workdir}/*.log")

    def session(self, app: str = "sparkml_dist-cluster-tests"):
        from tests.conftest import make_session

        return make_session(self.url, app, **{
            "spark.executor.cores": "1", "spark.cores.max": "2", "spark.executor.memory": "1g",
            "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
            "spark.executorEnv.PYTHONPATH": str(ROOT),
            "spark.executorEnv.SPARK_LOCAL_IP": "127.0.0.1",
            "spark.driver.host": "127.0.0.1"})

    def stop(self) -> None:
        for p in reversed(self.procs):  # workers (and their executors) first, then the master
            stop_group(p)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[tuple[str, Path]]:
    """``mlflow server --serve-artifacts`` on loopback, as a cluster's jobs need it: executors
    log over HTTP and upload artifacts through the server. Yields ``(url, artifacts_dir)``."""
    from tests.test_mlflow_server import SERVER_START_TIMEOUT_S, _healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with service(cmd, root / "server.log", env, root, lambda: _healthy(url), "mlflow server",
                 SERVER_START_TIMEOUT_S):
        yield url, root / "artifacts"
