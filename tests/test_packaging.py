"""The wheel (``make dist``): what it holds, that it installs into a fresh venv, and the pure parts
of the shipping pre-flight (which store executors cannot write to, which executor differs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sparkml_dist.spark import probe
from sparkml_dist.spark.preflight import compare_reports, local_store_problem

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 900  # every dependency, from pip's cache (about a minute here)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """Built verbosely from a copy of the sources, so setuptools' warnings can be read."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "sparkml_dist", src / "sparkml_dist",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w",
                           str(tmp / "dist"), str(src)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = (tmp / "dist").glob("sparkml_dist-*.whl")
    return built, proc.stdout + proc.stderr


def test_wheel_holds_sparkml_dist_alone_with_an_spdx_license(wheel):
    path, build_log = wheel
    names = zipfile.ZipFile(path).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"sparkml_dist", "sparkml_dist-0.1.0.dist-info"}, tops
    assert "sparkml_dist/spark/probe.py" in names
    metadata = zipfile.ZipFile(path).read("sparkml_dist-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Deprecat" not in build_log, [l for l in build_log.splitlines() if "Deprecat" in l]


def test_wheel_installs_into_a_fresh_venv_and_imports_there(wheel, tmp_path):
    path, _ = wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements.lock"),
                           str(path)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Run outside the checkout, so only the installed copy can be imported.
    out = subprocess.run([py, "-c", "import sparkml_dist, sys; print(sparkml_dist.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(venv) in out.stdout
    site = next((venv / "lib").glob("python3.*/site-packages"))
    dist_info = site / "sparkml_dist-0.1.0.dist-info"
    assert (dist_info / "top_level.txt").read_text().split() == ["sparkml_dist"]
    record = (dist_info / "RECORD").read_text().splitlines()
    assert {line.split("/")[0] for line in record} == {"sparkml_dist",
                                                       "sparkml_dist-0.1.0.dist-info"}
    assert not (site / "udfs").exists()


@pytest.mark.parametrize("uri", ["sqlite:////data/mlflow.db", "file:///data/mlruns", "/data/mlruns",
                                 "mlruns"])
def test_a_local_store_under_a_cluster_master_is_a_problem_naming_the_fix(uri):
    problem = local_store_problem(uri, "spark://head:7077")
    assert problem and uri in problem and "spark.master=spark://head:7077" in problem
    assert "--serve-artifacts" in problem and "MLFLOW_TRACKING_URI" in problem
    assert "tracking.shared_storage=true" in problem
    assert local_store_problem(uri, "local[2]") is None
    assert local_store_problem(uri, "local-cluster[2,1,1024]") is None


def test_a_server_is_fine_unless_its_artifacts_are_a_local_path():
    assert local_store_problem("http://head:5000", "yarn", "mlflow-artifacts:/1") is None
    assert local_store_problem("databricks", "spark://h:7077", "dbfs:/databricks/mlflow") is None
    problem = local_store_problem("postgresql://db/mlflow", "yarn", "/home/me/mlruns")
    assert problem and "artifact location /home/me/mlruns" in problem


def _report(host: str, **modules) -> dict:
    versions = {"torch": "2.13.0+cpu", "pyarrow": "25.0.1", "mlflow": "3.17.2",
                "sparkml_dist": "0.1.0"}
    out = {}
    for name, version in versions.items():
        got = modules.get(name, version)
        out[name] = ({"version": None, "error": f"ModuleNotFoundError: No module named '{name}'"}
                     if got is None else {"version": got, "error": None})
    out["sparkml_dist"]["code"] = modules.get("code", "abc")
    return {"host": host, "python": "/usr/bin/python3", "python_version": "3.11.7",
            "modules": out, "tracking_error": None}


def test_compare_reports_names_host_and_package_once_per_host():
    driver = _report("driver")["modules"]
    reports = [_report("a"), _report("b", torch=None), _report("b", torch=None),
               _report("c", mlflow="3.10.0", code="other")]
    problems = compare_reports(driver, "3.11.7", reports)
    assert problems == [
        "executor on b (Python /usr/bin/python3): torch missing (ModuleNotFoundError: No module "
        "named 'torch')",
        "executor on c (Python /usr/bin/python3): mlflow 3.10.0 (driver: 3.17.2); sparkml_dist "
        "0.1.0 with other code (code hash other, driver: abc): the executors' copy was built "
        "from another checkout; rebuild it"]
    assert compare_reports(driver, "3.11.7", reports[:1]) == []
    assert "Python 3.10.1 (driver: 3.11.7)" in compare_reports(
        driver, "3.11.7", [dict(_report("d"), python_version="3.10.1")])[0]


def test_probe_runs_on_the_driver_and_hashes_code_by_content(tmp_path):
    rep = probe.report(probe.REQUIRED, "sqlite:///x.db")
    assert rep["modules"]["torch"]["error"] is None and rep["tracking_error"] is None
    assert rep["modules"]["sparkml_dist"]["code"] == probe.code_hash(ROOT / "sparkml_dist")
    (tmp_path / "a.py").write_text("x = 1\n")
    before = probe.code_hash(tmp_path)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert probe.code_hash(tmp_path) != before
    unreachable = probe.reach("http://127.0.0.1:9", timeout_s=2)
    assert unreachable and "cannot reach the tracking server http://127.0.0.1:9" in unreachable
