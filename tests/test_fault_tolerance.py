"""Atomic checkpoints in the MLflow run and exact resume after a lost worker or driver."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sparkml_dist import JobConfig, final_state, fit
from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore
from sparkml_dist.tracking.run import JobRun

from tests.conftest import sqlite_store

ROOT = Path(__file__).resolve().parents[1]
K = 10  # checkpoint.every_steps


def ft_config(tracking_uri: str, **extra) -> JobConfig:
    base = {
        "data.features_col": "features", "data.val_fraction": 0.2,
        "model.factory": "sparkml_dist.models:mlp", "model.kwargs": {"hidden": [64], "dropout": 0.1},
        "optimizer.name": "adam", "optimizer.lr": 0.003, "optimizer.schedule": "cosine",
        "training.num_workers": 2, "training.batch_size": 32, "training.epochs": 3,
        "training.seed": 3, "training.log_every_steps": 5,
        "checkpoint.every_steps": K, "checkpoint.keep_last": 2,
        "fault.max_restarts": 2, "fault.backoff_s": 0.0,
        "tracking.tracking_uri": tracking_uri, "tracking.log_model": False,
        "tracking.progress": False}
    base.update(extra)
    return JobConfig().replace(**base)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max diff {(a[k] - b[k]).abs().max():.3e}"


@pytest.fixture(scope="module")
def digits_df(spark, digits_path):
    return spark.read.parquet(str(digits_path))


@pytest.fixture(scope="module")
def uninterrupted(digits_df, tmp_path_factory):
    uri = sqlite_store(tmp_path_factory.mktemp('ref') / "mlflow.db")
    result = fit(digits_df, ft_config(uri))
    assert result.attempts == 1 and result.ranks[0]["resumed_from"] == 0
    return final_state(result.run_id, uri)


def test_lost_worker_mid_epoch_resumes_exactly(digits_df, tracking_uri, uninterrupted):
    die_at = 2 * 23 + 7  # mid-epoch 3 (23 steps per epoch), 3 steps after a checkpoint
    cfg = ft_config(tracking_uri, **{"fault.inject": {"rank": 1, "step": die_at, "attempt": 0}})
    result = fit(digits_df, cfg)
    assert result.attempts == 2
    assert all(r["attempt"] == 1 for r in result.ranks)
    resumed = result.ranks[0]["resumed_from"]
    assert die_at - K <= resumed <= die_at, "no more than K steps may be redone"
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.tags["sparkml_dist.attempts"] == "2"
    # Spark reports whichever rank failed first: rank 1's crash or rank 0's broken collective.
    assert run.data.tags["sparkml_dist.failure.0"].startswith("worker_lost (reported by rank")
    assert run.data.metrics["fault/failed_attempts"] == 1
    assert_bitwise_equal(final_state(result.run_id, tracking_uri), uninterrupted)


def _store(tmp_path, keep_last=3) -> tuple[MlflowCheckpointStore, MlflowClient, str]:
    uri = sqlite_store(tmp_path / "mlflow.db")
    run = JobRun(JobConfig().replace(**{"tracking.tracking_uri": uri}))
    return MlflowCheckpointStore(uri, run.run_id, keep_last), run.client, run.run_id


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((4,), v)}}


def _fields(step: int) -> dict:
    return {"steps_done": step, "epoch": 0, "step_in_epoch": step}


def test_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog):
    store, client, run_id = _store(tmp_path)
    store.save(_state(1.0), _fields(10))
    store.save(_state(2.0), _fields(20))
    local = Path(client.get_run(run_id).info.artifact_uri.replace("file://", ""))
    state_file = local / "checkpoints" / "ckpt-0000000020" / "shared.pt"
    state_file.write_bytes(state_file.read_bytes()[:50])  # truncated on purpose
    with caplog.at_level(logging.WARNING):
        state, meta = store.load_latest()
    assert meta.steps_done == 10 and torch.equal(state["model"]["w"], torch.full((4,), 1.0))
    assert "ckpt-0000000020 is unreadable" in caplog.text


def test_checkpoint_without_metadata_is_incomplete_and_old_ones_are_pruned(tmp_path, caplog):
    store, client, run_id = _store(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        store.save(_state(step), _fields(step))
    names = [Path(f.path).name for f in client.list_artifacts(run_id, "checkpoints")]
    assert names == ["ckpt-0000000020", "ckpt-0000000030"]
    local = Path(client.get_run(run_id).info.artifact_uri.replace("file://", ""))
    (local / "checkpoints" / "ckpt-0000000030" / "meta.json").unlink()  # a write cut short
    with caplog.at_level(logging.WARNING):
        _, meta = store.load_latest()
    assert meta.steps_done == 20 and "ckpt-0000000030 has no meta.json" in caplog.text


def test_driver_killed_mid_run_resumes_with_resume_flag(digits_path, tmp_path, uninterrupted):
    uri = sqlite_store(tmp_path / "mlflow.db")
    sets = [f"data.source={digits_path}", "data.features_col=features", "data.val_fraction=0.2",
            "model.factory=tests.factories:slow_mlp",
            "model.kwargs={hidden: [64], dropout: 0.1, delay_s: 0.2}",
            f"tracking.tracking_uri={uri}", "tracking.log_model=false"]
    base = ft_config(uri)
    for key in ("optimizer.name", "optimizer.lr", "optimizer.schedule", "training.batch_size",
                "training.epochs", "training.seed", "training.log_every_steps",
                "checkpoint.every_steps"):
        section, name = key.split(".")
        sets.append(f"{key}={getattr(getattr(base, section), name)}")
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]",
           "--conf", "spark.ui.enabled=false", str(ROOT / "jobs/train.py"),
           "--config", str(ROOT / "conf/digits.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "first.log", "w"), start_new_session=True)
    client = MlflowClient(uri)
    run_id = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            try:
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()])
            except Exception:  # noqa: BLE001 - the store may not exist yet
                continue
            if runs and len(client.list_artifacts(runs[0].info.run_id, "checkpoints")) >= 2:
                run_id = runs[0].info.run_id
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait(timeout=30)
    assert run_id is not None, (tmp_path / "first.log").read_text()[-3000:]
    steps_at_kill = max(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps_at_kill < 69, "the driver must die mid-run"
    resumed = subprocess.run(cmd + ["--resume", run_id], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"MLflow run: {run_id}" in resumed.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # The slow model wraps the same MLP, so weights map onto the uninterrupted run's.
    state = {k.removeprefix("inner."): v for k, v in final_state(run_id, uri).items()}
    assert_bitwise_equal(state, uninterrupted)
