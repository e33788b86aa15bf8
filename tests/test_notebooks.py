"""Every notebook under ``notebooks/`` runs top to bottom in a fresh Jupyter kernel against local
Spark, with its parameters cell overridden (a temporary MLflow store, ``local[2]``, one epoch).

A notebook's first code cell carries the tag ``parameters`` (the papermill convention); the test
inserts a cell after it that reassigns the names below, so the notebook itself stays runnable as
is on a laptop or on Databricks.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nbclient
import nbformat
import pytest

from tests.conftest import sqlite_store

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
# Session state another test module may leave behind that would turn the kernel's
# SparkSession.builder into a Spark Connect client.
_CONNECT_ENV = ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE",
                "SPARK_API_MODE")


def _parameters_cell(nb) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return i
    raise AssertionError("the notebook has no code cell tagged 'parameters'; tag the cell that "
                         "assigns DATA_PATH, TRACKING_URI, NUM_WORKERS... so tests can override it")


def _assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def inject_parameters(nb, values: dict[str, object]) -> dict[str, object]:
    """Insert a cell after the parameters cell reassigning the names that cell defines; return
    the values actually injected."""
    at = _parameters_cell(nb)
    names = _assigned_names(nb.cells[at].source)
    used = {k: v for k, v in values.items() if k in names}
    source = "# injected by tests/test_notebooks.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in used.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, cell)
    return used


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found under {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path, digits_path: Path):
    from mlflow.tracking import MlflowClient

    nb = nbformat.read(path, as_version=4)
    tracking_uri = sqlite_store(tmp_path / "mlflow.db")
    used = inject_parameters(nb, {
        "DATA_PATH": str(digits_path), "TRACKING_URI": tracking_uri, "NUM_WORKERS": 2,
        "EPOCHS": 1, "SPARK_MASTER": "local[2]"})
    assert "TRACKING_URI" in used, "the parameters cell must define TRACKING_URI"

    env = {k: v for k, v in os.environ.items() if k not in _CONNECT_ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                                     kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    # A failing cell raises CellExecutionError with the cell's source and traceback.
    client.execute(env=env)
    nbformat.write(nb, tmp_path / path.name)  # the executed copy, for a look after a failure

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    runs = MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()])
    assert runs, "the notebook logged no MLflow run"
    assert all(r.info.status == "FINISHED" for r in runs)
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []) if o.get("output_type") == "stream")
    for run in runs:
        assert run.info.run_id in texts, "the notebook should print the id of the run it made"
        assert {"train/loss", "val/accuracy"} <= set(run.data.metrics)
    if path.stem == "quickstart":
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert images, "the quickstart should display the training-curve PNG"
        assert "predicted" in texts, "the quickstart should show SQL predictions"
    if path.stem == "fault_tolerance":
        assert sorted(r.data.tags.get("sparkml_dist.attempts") for r in runs) == ["1", "2"], \
            "one run recovers from the injected fault (2 attempts), one runs uninterrupted"
        assert any("sparkml_dist.failure.0" in r.data.tags for r in runs)
        assert "bitwise: True" in texts, "the resumed weights should equal the uninterrupted run's"
    if path.stem == "federated":
        assert {r.data.tags.get("sparkml_dist.strategy") for r in runs} == {"federated"}
        assert any("secagg/threshold" in r.data.metrics for r in runs)
    if path.stem == "horovod":
        assert {r.data.tags.get("sparkml_dist.backend") for r in runs} == {"horovod", "torch"}
        assert any(r.data.tags.get("horovod.compression") == "fp16" for r in runs)
