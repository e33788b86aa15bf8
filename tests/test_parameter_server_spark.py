"""``strategy.kind: parameter_server`` through ``fit`` on local Spark: servers started by the
driver, workers as ordinary Spark tasks, one MLflow run. ``sync`` equals the single-process
reference on the prepared shards (1 and 2 server shards); ``ssp``'s logged step stamps never
show a worker more than s steps ahead, and ``ssp`` and ``async`` reach ``sync``'s validation
accuracy within 1.5 points (at lr 0.05: at the YAML's 0.1 async's doubled step count overshoots
by about 2 points); a primary killed mid-run is replaced by its replica,
with the workers never restarted; async with checkpoint cuts and too few task slots is refused
before launch."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist import final_state, fit, load_config
from sparkml_dist.algo.ps import ssp_violations
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.data.shard_store import FEATURES, LABEL, ROW, SHARD, SPLIT
from sparkml_dist.spark.prepare import prepare
from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore
from tests.conftest import sqlite_store
from tests.ranks import Dataset, reference_weights

ROOT = Path(__file__).resolve().parents[1]
W = 2


def config(tracking_uri: str, *overrides: str):
    return load_config(ROOT / "conf/parameter_server.yaml", [
        f"tracking.tracking_uri={tracking_uri}", "tracking.progress=false", "training.epochs=8",
        "strategy.replicas=0", "optimizer.lr=0.05", *overrides])


class _Shards(Dataset):
    """The prepared training shards as one array, split the way the workers read them."""

    def __init__(self, x, y, shards):
        super().__init__(x, y)
        object.__setattr__(self, "shards", shards)

    def split(self, world):
        assert world == len(self.shards)
        return self.shards, np.empty(0, np.int64)


def prepared_shards(spark, df, cfg) -> _Shards:
    prepared = prepare(spark, df, cfg.data, DataLayout.one_per_rank(W), cfg.training.seed)
    try:
        t = prepared.frame.toArrow()
    finally:
        prepared.release()
    t = t.filter(pc.equal(t.column(SPLIT), 0)).sort_by([(SHARD, "ascending"),
                                                        (ROW, "ascending")])
    x = np.array(t.column(FEATURES).to_pylist(), dtype=np.float32)
    y = np.array(t.column(LABEL).to_pylist(), dtype=np.int64)
    shard = np.array(t.column(SHARD).to_pylist())
    return _Shards(x, y, [np.flatnonzero(shard == r) for r in range(W)])


@pytest.fixture(scope="module")
def df(spark, digits_path):
    return spark.read.parquet(str(digits_path))


@pytest.fixture(scope="module")
def sync_result(df, tmp_path_factory):
    uri = sqlite_store(tmp_path_factory.mktemp('ps') / "mlflow.db")
    cfg = config(uri, "strategy.mode=sync", "strategy.num_servers=2")
    return cfg, fit(df, cfg), uri


@pytest.mark.parametrize("servers", [1, 2])
def test_sync_through_fit_equals_the_single_process_reference(spark, df, tracking_uri, servers,
                                                              sync_result):
    if servers == 2:
        cfg, result, uri = sync_result
    else:
        cfg = config(tracking_uri, "strategy.mode=sync", "strategy.num_servers=1",
                     "training.epochs=1", "tracking.log_model=false")
        result, uri = fit(df, cfg), tracking_uri
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sparkml_dist.strategy"] == "parameter_server"
    assert "bitwise" in run.data.tags["sparkml_dist.resume_guarantee"]
    assert len(json.loads(run.data.tags["sparkml_dist.ps.servers"])) == servers
    ref = reference_weights(cfg, prepared_shards(spark, df, cfg))
    got = final_state(result.run_id, uri)
    for name, value in ref.items():
        assert (got[name] - value).abs().max().item() <= 1e-5, name
    assert result.metrics["ps/staleness_max"] == 0


def test_sync_logs_its_model_and_measurements(sync_result):
    import mlflow

    cfg, result, uri = sync_result
    assert result.model_uri is not None and result.metrics["val/accuracy"] >= 0.9
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(result.model_uri)
    assert model.predict(np.zeros((2, 64), np.float32)).shape[0] == 2
    m = result.metrics
    assert m["ps/bytes_pushed"] > 0 and m["ps/bytes_pulled"] > 0 and m["ps/samples_per_s"] > 0
    assert m["ps/worker_0/steps_per_s"] > 0 and m["ps/worker_1/steps_per_s"] > 0
    client = MlflowClient(uri)
    assert len(client.get_metric_history(result.run_id, "train/loss")) > 3
    names = {a.path for a in client.list_artifacts(result.run_id, "ps")}
    assert {"ps/events.json", "ps/staleness.json", "ps/workers.json"} <= names


@pytest.mark.parametrize("mode", ["ssp", "async"])
def test_stale_modes_reach_sync_accuracy_and_ssp_keeps_its_bound(df, tracking_uri, sync_result,
                                                                  mode):
    # ssp gets a straggler so its bound is reached; async's staleness is unbounded, and with a
    # persistent straggler on 2 loaded cores it fell ~40 steps behind (0.936 against sync's
    # 0.953 once): async runs as it would on an even cluster, its staleness from arrival order.
    straggler = ["strategy.straggler_sleep_s={1: 0.01}"] if mode == "ssp" else []
    cfg = config(tracking_uri, f"strategy.mode={mode}", "strategy.staleness=2", *straggler,
                 "tracking.log_model=false")
    result = fit(df, cfg)
    sync_acc = sync_result[1].metrics["val/accuracy"]
    assert result.metrics["val/accuracy"] >= sync_acc - 0.015, (result.metrics, sync_acc)
    path = MlflowClient(tracking_uri).download_artifacts(result.run_id, "ps/events.json")
    events = json.loads(Path(path).read_text())
    assert set(events) == {"0", "1"}
    if mode == "ssp":
        for log in events.values():
            assert ssp_violations(log, W, 2) == []
        # The workers' own stamps agree: when a worker got its parameters for step c, the
        # slowest worker had been acknowledged for c - s - 1 steps or more; an ack still in
        # flight can make it look one behind (the servers' order above is the exact check).
        path = MlflowClient(tracking_uri).download_artifacts(result.run_id, "ps/workers.json")
        workers = json.loads(Path(path).read_text())
        done = [sorted(end for *_, end in w["stamps"]) for w in workers]
        ahead = 0
        for w in workers:
            for step, _, pulled, _ in w["stamps"]:
                slowest = min(int(np.searchsorted(d, pulled, side="right")) for d in done)
                ahead = max(ahead, step - slowest)
        assert 2 <= ahead <= 2 + 1, ahead
    else:
        assert result.metrics["ps/staleness_max"] > 0


def test_killed_primary_is_replaced_by_its_replica_through_fit(df, tracking_uri, sync_result):
    cfg = config(tracking_uri, "strategy.mode=sync", "strategy.num_servers=2",
                 "strategy.replicas=1", "strategy.straggler_sleep_s={0: 0.03, 1: 0.03}",
                 "tracking.log_model=false")
    killed: dict = {}

    def killer():
        client = MlflowClient(tracking_uri)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            runs = client.search_runs([exp.experiment_id]) if exp else []
            tag = runs[0].data.tags.get("sparkml_dist.ps.servers") if runs else None
            if tag and MlflowCheckpointStore(tracking_uri, runs[0].info.run_id).complete_names():
                # the first cut (end of epoch 1 of 8) is in: the workers are mid-run
                victim = next(s for s in json.loads(tag)
                              if s["shard"] == 1 and s["role"] == "primary")
                os.kill(victim["pid"], signal.SIGKILL)
                killed.update(victim)
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer)
    t.start()
    result = fit(df, cfg)
    t.join()
    assert killed, "the primary was never killed"
    assert result.metrics["ps/failovers"] == W  # each worker switched once
    total = None
    for r in result.ranks:
        assert r["attempt"] == 0 and r["start_step"] == 0  # no worker restarted
        (f,) = r["failovers"]
        total = r["steps"]
        assert f["shard"] == 1 and killed["address"] in f["from"] and 0 < f["context"] < total
    sync = sync_result[1]
    assert abs(result.metrics["val/accuracy"] - sync.metrics["val/accuracy"]) <= 0.015
    # the replica applied every acknowledged push in order: the very same model as undisturbed
    assert result.metrics["val/loss"] == pytest.approx(sync.metrics["val/loss"], abs=1e-5)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_resume_continues_from_a_consistent_cut(df, tracking_uri, sync_result, mode):
    """Worker 1 dies at step 50 and the job fails; resuming the run starts every shard and
    worker at the newest cut (every shard at one step, every worker at that step of its data
    order): sync ends bitwise where the undisturbed job did, async within its accuracy."""
    from sparkml_dist.config import FaultInjection

    cfg = config(tracking_uri, f"strategy.mode={mode}", "strategy.num_servers=2",
                 "checkpoint.every_steps=20", "tracking.log_model=false")
    with pytest.raises(Exception, match="parameter-server workers failed"):
        fit(df, cfg.replace(**{"fault.inject": FaultInjection(rank=1, step=50)}))
    client = MlflowClient(tracking_uri)
    (failed,) = client.search_runs([client.get_experiment_by_name(
        cfg.tracking.experiment).experiment_id])
    assert failed.info.status == "FAILED"
    store = MlflowCheckpointStore(tracking_uri, failed.info.run_id)
    cut = store.read_meta(store.complete_names()[0]).steps_done
    assert 40 <= cut <= 50, cut  # cuts at 20, 40, the epoch end (45), 60, ...
    result = fit(df, cfg, resume_run_id=failed.info.run_id)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.run_id == failed.info.run_id
    assert run.data.tags["sparkml_dist.ps.resumed_from"] == str(cut)
    assert "consistent cut" in run.data.tags["sparkml_dist.resume_guarantee"]
    for r in result.ranks:  # each worker's steps after the cut: no step skipped or repeated
        assert r["start_step"] == cut and r["start_step"] + r["steps"] == 8 * 45
    if mode == "sync":
        ref = final_state(sync_result[1].run_id, sync_result[2])
        got = final_state(result.run_id, tracking_uri)
        assert all(torch_equal(got[k], ref[k]) for k in ref)
        assert "bitwise" in run.data.tags["sparkml_dist.resume_guarantee"]
    else:
        sync_acc = sync_result[1].metrics["val/accuracy"]
        assert result.metrics["val/accuracy"] >= sync_acc - 0.015


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_async_with_cuts_and_too_few_slots_is_refused_before_launch(spark, df, tracking_uri):
    """local[2] has 2 task slots: 3 async workers cannot all meet at a checkpoint cut (every
    pull there waits for every worker), so the job is refused before any data is prepared;
    without a cut before the last step async may run with fewer slots than workers."""
    from sparkml_dist.errors import ClusterError
    from sparkml_dist.strategies.parameter_server.driver import _check

    cfg = config(tracking_uri, "strategy.mode=async", "training.num_workers=3",
                 "training.epochs=2")
    with pytest.raises(ClusterError, match=r"checkpoint\.enabled=true.*training\.epochs=2.*"
                                           r"checkpoint\.every_steps=0.*training\.num_workers=3"
                                           r".*2 task slots"):
        fit(df, cfg)
    with pytest.raises(ClusterError, match=r"checkpoint\.every_steps=10"):
        _check(spark, cfg.replace(**{"training.epochs": 1, "checkpoint.every_steps": 10}),
               cfg.strategy)
    for ok in ({"training.epochs": 1}, {"checkpoint.enabled": False, "tracking.log_model": False}):
        _check(spark, cfg.replace(**ok), cfg.strategy)  # no cut before the last step: allowed
