"""Training against a real ``mlflow server`` over HTTP, with artifacts proxied by the server.

The embedded SQLite store hides what only the HTTP path does: artifact URIs are
``mlflow-artifacts:/...`` and resolve against the tracking URI, uploads, listings and deletes
(checkpoint pruning) are REST calls, and the Spark ranks talk to the server from their own
processes.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.services import free_port, service

SERVER_START_TIMEOUT_S = 120.0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and server-side artifacts; yields
    ``(url, artifacts_dir)``. The server and its uvicorn worker share a process group, which is
    what gets stopped."""
    root = tmp_path_factory.mktemp("mlflow_server")
    artifacts = root / "artifacts"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(artifacts), "--serve-artifacts"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with service(cmd, log_path, env, root, lambda: _healthy(url), "mlflow server",
                 SERVER_START_TIMEOUT_S):
        yield url, artifacts


@pytest.fixture
def global_uri_elsewhere(tmp_path):
    """Point MLflow's process-global tracking URI away from the server, as it is on an executor
    that never called ``mlflow.set_tracking_uri``; restore it afterwards."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    yield
    mlflow.set_tracking_uri(before)


def test_checkpoint_store_prunes_over_http(mlflow_server, global_uri_elsewhere):
    """Regression: the store resolved ``mlflow-artifacts:`` URIs against the global tracking URI,
    so it failed on every rank of a job tracked by a server."""
    import torch
    from mlflow.tracking import MlflowClient

    from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore

    url, artifacts = mlflow_server
    client = MlflowClient(url)
    run = client.create_run(client.create_experiment("checkpoint-store"))
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    store = MlflowCheckpointStore(url, run.info.run_id, keep_last=1)
    for step in (1, 2, 3):
        store.save({"w": torch.full((3,), float(step))},
                   {"steps_done": step, "epoch": 0, "step_in_epoch": step})
    listed = [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert listed == ["checkpoints/ckpt-0000000003"]
    on_disk = list(artifacts.rglob(f"{run.info.run_id}/artifacts/checkpoints/ckpt-*"))
    assert [p.name for p in on_disk] == ["ckpt-0000000003"], "deleted on the server's disk too"
    state, meta = store.load_latest()
    assert meta.steps_done == 3 and torch.equal(state["w"], torch.full((3,), 3.0))


def test_fit_tracked_by_mlflow_server(spark, mlflow_server, digits_path, tmp_path):
    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from sparkml_dist import fit

    url, artifacts = mlflow_server
    df = spark.read.parquet(str(digits_path)).limit(400)
    res = fit(df, **{"data.features_col": "features", "training.epochs": 3,
                     "training.num_workers": 2, "training.batch_size": 32,
                     "training.log_every_steps": 2, "checkpoint.every_steps": 2,
                     "checkpoint.keep_last": 2, "tracking.tracking_uri": url,
                     "tracking.experiment": "http-fit", "tracking.progress": False})
    assert res.tracking_uri == url
    client = MlflowClient(url)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")

    params = run.data.params
    assert params["training.epochs"] == "3" and params["training.num_workers"] == "2"
    assert int(params["data.rows_train"]) + int(params["data.rows_val"]) == 400
    loss_steps = [m.step for m in client.get_metric_history(res.run_id, "train/loss")]
    acc = client.get_metric_history(res.run_id, "val/accuracy")
    assert len(set(loss_steps)) >= 5 and len({m.step for m in acc}) == 3  # one per epoch
    assert all(0.0 <= m.value <= 1.0 for m in acc)

    total = int(run.data.metrics["progress/total_steps"])
    ckpts = sorted(f.path for f in client.list_artifacts(res.run_id, "checkpoints") if f.is_dir)
    assert len(ckpts) == 2, f"pruning over HTTP should keep 2 checkpoints, found {ckpts}"
    assert ckpts[-1] == f"checkpoints/ckpt-{total:010d}"
    on_disk = sorted(p.name for p in artifacts.rglob(f"{res.run_id}/artifacts/checkpoints/*"))
    assert on_disk == [Path(c).name for c in ckpts]
    for ckpt in ckpts:
        names = {Path(f.path).name for f in client.list_artifacts(res.run_id, ckpt)}
        assert names == {"meta.json", "shared.pt"}
    meta = json.loads(Path(client.download_artifacts(res.run_id, f"{ckpts[-1]}/meta.json",
                                                     str(tmp_path))).read_text())
    assert meta["steps_done"] == total

    png = Path(client.download_artifacts(res.run_id, "plots/training_curves.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(url)
    try:
        model = mlflow.pyfunc.load_model(res.model_uri)
    finally:
        mlflow.set_tracking_uri(before)
    x = np.stack([np.asarray(r["features"], dtype=np.float32)
                  for r in df.select("features").limit(5).collect()])
    out = np.asarray(model.predict(x))
    assert out.shape == (5, 10) and np.isfinite(out).all()
