"""Parameter servers without Spark: the pure math (sharding, the SSP rule, staleness) against
hand-computed cases, then real server processes on loopback with workers in threads: ``sync``
against the single-process reference (1 and 2 shards), ``ssp``'s bound from the servers' event
logs, ``async``/``ssp`` accuracy against ``sync``, failover to a replica after the primary is
killed, a retried worker resuming from its server-side clock, a dead server's error, frames
that fail authentication or announce too large a body, checkpoint commits that fail or race the
final sweep, failover to a replica its primary dropped, and spec files gone once servers run."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch

from sparkml_dist.algo.ps import (
    StalenessHistogram, is_cut, may_proceed, pull_ready, shard_parameters, ssp_violations)
from sparkml_dist.config import JobConfig
from sparkml_dist.errors import ConfigError
from sparkml_dist.strategies.parameter_server import wire
from sparkml_dist.strategies.parameter_server.client import Servers, ServerLost
from sparkml_dist.strategies.parameter_server.plan import plan_job, worker_task
from sparkml_dist.strategies.parameter_server.processes import ServerGroup
from sparkml_dist.strategies.parameter_server.worker import train_worker
from tests.ranks import digits, rank_stores, reference_weights

# -- pure math ------------------------------------------------------------------------------


def test_sharding_is_greedy_largest_first_and_balanced():
    sizes = [("a", 10), ("b", 7), ("c", 6), ("d", 5), ("e", 2)]
    # 10 -> s0; 7 -> s1; 6 -> s1 (7 < 10)?  no: loads (10, 7) -> s1 gets 6 (13); 5 -> s0 (15);
    # 2 -> s1 (15)
    assert shard_parameters(sizes, 2) == [["a", "d"], ["b", "c", "e"]]
    assert shard_parameters(sizes, 1) == [["a", "b", "c", "d", "e"]]
    # ties go to the lowest shard; names come back in model order
    assert shard_parameters([("x", 3), ("y", 3), ("z", 3)], 3) == [["x"], ["y"], ["z"]]
    with pytest.raises(ValueError, match="num_servers to at most 2"):
        shard_parameters([("x", 1), ("y", 1)], 3)


def test_ssp_rule_and_pull_readiness():
    # Ho et al.: a worker at clock c proceeds iff c - min_clock <= s
    assert may_proceed(5, [5, 3], 2) and not may_proceed(6, [6, 3], 2)
    assert may_proceed(3, [3, 3], 0) and not may_proceed(4, [4, 3], 0)
    assert pull_ready("sync", 4, 4, [5, 4], 0) and not pull_ready("sync", 5, 4, [5, 4], 0)
    assert pull_ready("async", 100, 0, [100, 0], 0)
    assert pull_ready("ssp", 4, 0, [4, 2], 2) and not pull_ready("ssp", 5, 0, [5, 2], 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        pull_ready("bsp", 0, 0, [0], 0)


def test_staleness_histogram_and_violation_check():
    h = StalenessHistogram()
    for s in [0, 0, 1, 3, 3, 3]:
        h.add(s)
    assert h.counts == {0: 2, 1: 1, 3: 3} and h.total == 6 and h.max() == 3
    assert h.mean() == pytest.approx(10 / 6) and h.quantile(0.5) == 1 and h.quantile(1) == 3
    h.merge({"2": 4})
    assert h.counts[2] == 4
    events = [{"op": "push", "worker": 0, "step": 0}, {"op": "pull", "worker": 0, "step": 1},
              {"op": "pull", "worker": 0, "step": 2},  # worker 1 still at clock 0: 2 - 0 > 1
              {"op": "push", "worker": 1, "step": 0}, {"op": "pull", "worker": 0, "step": 2}]
    assert ssp_violations(events, 2, 1) == [{"worker": 0, "step": 2, "min_clock": 0}]
    assert ssp_violations(events, 2, 2) == []


def test_cuts_fall_on_epoch_ends_and_every_n_steps_but_never_first_or_last():
    # 45 steps per epoch, 3 epochs, every 20 steps
    assert [k for k in range(136) if is_cut(k, 45, 20, 135)] == [20, 40, 45, 60, 80, 90, 100,
                                                                 120]
    assert [k for k in range(136) if is_cut(k, 45, 0, 135)] == [45, 90]


def test_config_validates_its_settings():
    ok = JobConfig().replace(**{"strategy.kind": "parameter_server", "strategy.mode": "ssp",
                                "strategy.staleness": 0})
    assert ok.strategy.mode == "ssp" and ok.strategy.staleness == 0
    for key, value, msg in [("strategy.mode", "bsp", "strategy.mode"),
                            ("strategy.staleness", -1, "strategy.staleness"),
                            ("strategy.num_servers", 0, "strategy.num_servers"),
                            ("strategy.replicas", 2, "strategy.replicas"),
                            ("strategy.straggler_sleep_s", {0: -1.0}, "straggler_sleep_s")]:
        with pytest.raises(ConfigError, match=msg):
            JobConfig().replace(**{"strategy.kind": "parameter_server", key: value})


def test_frames_authenticate_and_refuse_a_wrong_secret():
    a, b = socket.socketpair()
    with a, b:
        wire.send(a, b"k" * 32, {"op": "pull", "step": 3}, wire.to_bytes(np.arange(4.0)))
        header, body, _ = wire.recv(b, b"k" * 32)
        assert header == {"op": "pull", "step": 3}
        assert wire.from_bytes(body, 4, "test").tolist() == [0.0, 1.0, 2.0, 3.0]
        wire.send(a, b"k" * 32, {"op": "pull"})
        with pytest.raises(wire.WireError, match="authentication"):
            wire.recv(b, b"x" * 32)


# -- servers on loopback, workers in threads ------------------------------------------------

W = 2


def job(mode: str = "sync", servers: int = 1, epochs: int = 2, **extra) -> JobConfig:
    return JobConfig().replace(**{
        "training.num_workers": W, "training.epochs": epochs, "training.batch_size": 16,
        "optimizer.name": "sgd", "optimizer.lr": 0.1, "optimizer.momentum": 0.5,
        "strategy.kind": "parameter_server", "strategy.mode": mode,
        "strategy.num_servers": servers, "backend.timeout_s": 60.0, **extra})


@pytest.fixture(scope="module")
def data():
    return digits()


def run_job(cfg: JobConfig, ds, during=None, workers=None):
    """Start the servers, train every worker in a thread, return (model state, worker reports,
    server reports, the group's process table). ``during(group, reports)`` runs alongside."""
    plan = plan_job(cfg, ds.x.shape[1], int(ds.y.max()) + 1, ds.shard_sizes(W))
    secret = os.urandom(32)
    group = ServerGroup("127.0.0.1", secret)
    try:
        eps = group.start(plan.specs, plan.initial_values(), cfg.strategy.replicas)
        task = worker_task(plan, cfg, eps, secret, ds.x.shape[1], int(ds.y.max()) + 1)
        reps, errors = {}, {}

        def work(w, t=task):
            try:
                reps[w] = train_worker(t, w, rank_stores(ds, w, W)[0])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors[w] = exc

        threads = [threading.Thread(target=work, args=(w,)) for w in (workers or range(W))]
        for t in threads:
            t.start()
        if during is not None:
            during(group, plan, task, reps)
        for t in threads:
            t.join(timeout=300)
        procs = group.describe()
        if errors:
            return None, reps, errors, procs
        client = Servers(eps, secret, 60.0, plan.sizes)
        plan.load(client.state())
        server_reports = client.reports()
        client.close()
    finally:
        group.stop()
    return plan.model.state_dict(), reps, server_reports, procs


def accuracy(state, ds) -> float:
    from sparkml_dist.models import build_model

    model = build_model("sparkml_dist.models:mlp", ds.x.shape[1], int(ds.y.max()) + 1, {})
    model.load_state_dict(state)
    _, val = ds.split(W)
    with torch.no_grad():
        pred = model(torch.from_numpy(ds.x[val])).argmax(1).numpy()
    return float((pred == ds.y[val]).mean())


@pytest.fixture(scope="module")
def sync_run(data):
    cfg = job("sync", 2, epochs=3)
    state, reps, servers, _ = run_job(cfg, data)
    return cfg, state, reps, servers


@pytest.mark.parametrize("servers", [1, 2])
def test_sync_equals_the_single_process_reference(data, servers, sync_run):
    if servers == 2:
        cfg, state, _, reports = sync_run
    else:
        cfg = job("sync", 1, epochs=1)
        state, _, reports, _ = run_job(cfg, data)
    assert len(reports) == servers
    ref = reference_weights(cfg, data)
    for name, value in ref.items():
        assert (state[name] - value).abs().max().item() <= 1e-5, name
    assert all(r["report"]["staleness"] == {"0": r["report"]["pushes"]} for r in reports)


@pytest.mark.parametrize("staleness", [0, 2])
def test_ssp_keeps_every_worker_within_s_steps_and_reaches_sync_accuracy(data, sync_run,
                                                                         staleness):
    # Worker 1 is a straggler: without the bound, worker 0 would run far ahead.
    cfg = job("ssp", 2, epochs=3, **{"strategy.staleness": staleness,
                                     "strategy.straggler_sleep_s": {1: 0.01}})
    state, reps, servers, _ = run_job(cfg, data)
    for s in servers:
        pulls = [e for e in s["events"] if e["op"] == "pull"]
        assert len(pulls) == W * plan_total(cfg, data)
        assert ssp_violations(s["events"], W, staleness) == []
        # the bound is reached (worker 0 really does run ahead) but never exceeded
        lead = _max_lead(s["events"])
        assert lead == staleness, lead
    acc, sync_acc = accuracy(state, data), accuracy(sync_run[1], data)
    assert acc >= sync_acc - 0.015, (acc, sync_acc)


def _max_lead(events) -> int:
    clocks = [0] * W
    lead = 0
    for e in events:
        if e["op"] == "push":
            clocks[e["worker"]] = e["step"] + 1
        else:
            lead = max(lead, e["step"] - min(clocks))
    return lead


def test_async_never_waits_and_reaches_sync_accuracy(data, sync_run):
    cfg = job("async", 2, epochs=3, **{"strategy.straggler_sleep_s": {1: 0.01}})
    state, reps, servers, _ = run_job(cfg, data)
    acc, sync_acc = accuracy(state, data), accuracy(sync_run[1], data)
    assert acc >= sync_acc - 0.015, (acc, sync_acc)
    hist = StalenessHistogram()
    for s in servers:
        hist.merge({int(k): v for k, v in s["report"]["staleness"].items()})
    assert hist.max() > 0  # pushes did land on parameters other workers had moved
    # nobody waited for the straggler: the servers' event logs show the fast worker pulling
    # steps far ahead of it (sync holds that lead to 1 step, ssp to s), whatever the load
    for s in servers:
        lead = _max_lead(s["events"])
        assert lead >= 10, lead


def test_killed_primary_fails_over_to_its_replica_without_restarting(data, sync_run):
    cfg = job("sync", 2, epochs=3, **{"strategy.replicas": 1,
                                      "strategy.straggler_sleep_s": {0: 0.03, 1: 0.03}})
    killed = {}

    def kill_primary(group, plan, task, reps):
        wait_for_version(task, plan, 20)  # workers are stepping (135 steps, about 4 s)
        primary = next(p for p in group.describe() if p["shard"] == 0 and p["role"] == "primary")
        os.kill(primary["pid"], signal.SIGKILL)
        killed.update(primary)

    state, reps, servers, _ = run_job(cfg, data, during=kill_primary)
    assert state is not None, servers
    total = plan_total(cfg, data)
    for w in range(W):
        assert reps[w]["start_step"] == 0 and reps[w]["steps"] == total  # never restarted
        (f,) = reps[w]["failovers"]
        assert f["shard"] == 0 and "primary" in f["from"] and "replica" in f["to"]
        assert 0 < f["context"] < total - 1, f  # it happened mid-run
    assert servers[0]["report"]["role"] == "replica"
    # the replica held every acknowledged push: the result is the undisturbed one
    for name, value in sync_run[1].items():
        assert (state[name] - value).abs().max().item() <= 1e-5, name
    assert abs(accuracy(state, data) - accuracy(sync_run[1], data)) <= 0.015


def wait_for_version(task, plan, version: int, timeout_s: float = 120.0) -> None:
    """Until shard 0 has applied ``version`` updates (the workers are mid-run)."""
    client = Servers([list(e) for e in task.endpoints], task.secret, 60.0, plan.sizes)
    deadline = time.monotonic() + timeout_s
    try:
        while client.reports()[0]["report"]["version"] < version:
            assert time.monotonic() < deadline, "the workers never got going"
            time.sleep(0.05)
    finally:
        client.close()


def plan_total(cfg, ds) -> int:
    return plan_job(cfg, ds.x.shape[1], 10, ds.shard_sizes(W)).total_steps


def test_a_retried_worker_resumes_at_its_server_clock(data):
    """Worker 0's first task stops after 7 steps (as if its executor died); the retry asks the
    servers where it was and continues; the result still equals the reference."""
    cfg = job("sync", 2, epochs=1)

    def retry_worker0(group, plan, task, reps):
        import dataclasses

        first = dataclasses.replace(task, total_steps=7)
        reps["first"] = train_worker(first, 0, rank_stores(data, 0, W)[0])
        reps[0] = train_worker(task, 0, rank_stores(data, 0, W)[0])

    state, reps, _, _ = run_job(cfg, data, during=retry_worker0, workers=[1])
    assert reps["first"]["steps"] == 7 and reps[0]["start_step"] == 7
    for name, value in reference_weights(cfg, data).items():
        assert (state[name] - value).abs().max().item() <= 1e-5, name


def test_a_lost_server_without_replica_is_an_error_naming_it(data):
    cfg = job("sync", 1, epochs=3, **{"strategy.straggler_sleep_s": {0: 0.03, 1: 0.03}})

    def kill(group, plan, task, reps):
        wait_for_version(task, plan, 20)
        os.kill(group.describe()[0]["pid"], signal.SIGKILL)

    state, _, errors, procs = run_job(cfg, data, during=kill)
    assert state is None and set(errors) == {0, 1}
    msg = str(errors[0])
    assert isinstance(errors[0], ServerLost)
    assert f"shard 0 primary at {procs[0]['address']}" in msg and "strategy.replicas=1" in msg


def test_a_server_exits_when_its_driver_is_gone(tmp_path):
    """A driver killed without stopping its servers leaves none behind."""
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(
        "import os, sys\n"
        "from sparkml_dist.config import JobConfig\n"
        "from sparkml_dist.strategies.parameter_server.plan import plan_job\n"
        "from sparkml_dist.strategies.parameter_server.processes import ServerGroup\n"
        "cfg = JobConfig().replace(**{'strategy.kind': 'parameter_server'})\n"
        "plan = plan_job(cfg, 8, 3, [10, 10])\n"
        "g = ServerGroup('127.0.0.1', os.urandom(32))\n"
        "g.start(plan.specs, plan.initial_values(), 0)\n"
        "print(g.describe()[0]['pid'], flush=True)\n"
        "os._exit(0)  # no stop()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    pid = int(out.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"server {pid} outlived its driver")


# -- review fixes: commits, limits, stale replicas, spec files ------------------------------


class _Store:
    """A checkpoint store that records what it saved, optionally slow or failing."""

    def __init__(self, fail: bool = False, delay_s: float = 0.0):
        self.fail, self.delay_s = fail, delay_s
        self.saved: list[int] = []
        self.started = threading.Event()

    def save(self, state, meta) -> None:
        self.started.set()
        time.sleep(self.delay_s)
        if self.fail:
            raise OSError("artifact store unreachable")
        self.saved.append(meta["steps_done"])


def _cut_files(tmp_path, step: int = 20):
    """Both shards' cut files for ``step`` of a 2-shard plan, as the shards write them."""
    cfg = job("sync", 2)
    plan = plan_job(cfg, 8, 3, [40, 40])
    for i, vals in enumerate(plan.initial_values()):
        vec = torch.cat([v.reshape(-1) for v in vals])
        torch.save({"step": step, "values": vec}, tmp_path / f"shard{i}-step{step:09d}.pt")
    return plan


def test_a_failed_cut_commit_is_a_checkpoint_error_naming_the_step(tmp_path):
    from sparkml_dist.errors import CheckpointError
    from sparkml_dist.strategies.parameter_server.cuts import CutCollector

    plan = _cut_files(tmp_path, 20)
    with pytest.raises(CheckpointError, match=r"step 20 .*OSError: artifact store unreachable"):
        with CutCollector(tmp_path, plan, _Store(fail=True), {}, interval_s=0.01):
            time.sleep(0.2)  # the thread tries (and fails) at least once
    # a training error already propagating is not hidden by the failing commit
    with pytest.raises(ZeroDivisionError):
        with CutCollector(tmp_path, plan, _Store(fail=True), {}, interval_s=0.01):
            raise ZeroDivisionError("the workers failed")
    # a commit that works is made once and its files are removed
    store = _Store()
    with CutCollector(tmp_path, plan, store, {}, interval_s=0.01):
        pass
    assert store.saved == [20] and not list(tmp_path.glob("shard*"))


def test_the_final_sweep_waits_for_a_commit_the_thread_still_runs(tmp_path):
    """``__exit__`` stops waiting for the thread (join timeout) while it is mid-commit: the
    final sweep must not save the same step a second time."""
    from sparkml_dist.strategies.parameter_server.cuts import CutCollector

    plan = _cut_files(tmp_path, 20)
    store = _Store(delay_s=0.5)
    with CutCollector(tmp_path, plan, store, {}, interval_s=0.01, join_timeout_s=0.01):
        assert store.started.wait(10)
    assert store.saved == [20]


def test_a_frame_announcing_a_huge_body_is_refused_before_it_is_read(tmp_path):
    import struct

    a, b = socket.socketpair()
    with a, b:
        # only the 8-byte prefix is sent: reading the tag or body would block
        a.sendall(struct.pack(">II", 10, (1 << 32) - 1))
        b.settimeout(5)
        with pytest.raises(wire.WireError, match="over the limits"):
            wire.recv(b, b"k" * 32, max_body=wire.max_body_for(100))
    # a real server drops such a connection at once (it does not wait for 4 GiB)
    cfg = job("sync", 1)
    plan = plan_job(cfg, 8, 3, [40, 40])
    group = ServerGroup("127.0.0.1", os.urandom(32))
    try:
        (ep,), = group.start(plan.specs, plan.initial_values(), 0)
        with socket.create_connection((ep.host, ep.port), timeout=10) as s:
            s.sendall(struct.pack(">II", 10, (1 << 32) - 1))
            assert s.recv(1) == b""  # closed by the server, not a timeout
    finally:
        group.stop()


def test_server_spec_files_are_gone_once_the_servers_are_up():
    cfg = job("sync", 2, **{"strategy.replicas": 1})
    plan = plan_job(cfg, 8, 3, [40, 40])
    group = ServerGroup("127.0.0.1", os.urandom(32))
    try:
        group.start(plan.specs, plan.initial_values(), 1)
        assert len(group.describe()) == 4
        assert sorted(p.name for p in group.dir.glob("*.pt")) == []
    finally:
        group.stop()
    assert not group.dir.exists()


def test_failover_to_a_replica_its_primary_dropped_is_a_clear_error():
    """The replica stalls (SIGSTOP) past backend.timeout_s, so its primary drops it at step 1
    and goes on alone; the replica comes back, then the primary dies: a client must not fail
    over to the live but stale replica (its pulls would silently return old values)."""
    cfg = job("async", 1, **{"strategy.replicas": 1, "backend.timeout_s": 2.0})
    plan = plan_job(cfg, 8, 3, [40, 40])
    secret = os.urandom(32)
    group = ServerGroup("127.0.0.1", secret)
    try:
        eps = group.start(plan.specs, plan.initial_values(), 1)
        procs = {p["role"]: p for p in group.describe()}
        client = Servers(eps, secret, 30.0, plan.sizes)
        zeros = [np.ones(n, np.float32) for n in plan.sizes]
        try:
            _, versions = client.pull(0, 0)
            client.push(0, 0, versions, zeros)
            os.kill(procs["replica"]["pid"], signal.SIGSTOP)
            try:
                for step in (1, 2):  # the forward of step 1 times out: the replica is dropped
                    _, versions = client.pull(0, step)
                    client.push(0, step, versions, zeros)
            finally:
                os.kill(procs["replica"]["pid"], signal.SIGCONT)
            os.kill(procs["primary"]["pid"], signal.SIGKILL)
            with pytest.raises(ServerLost) as err:
                client.pull(0, 3)
        finally:
            client.close()
    finally:
        group.stop()
    msg = str(err.value)
    assert f"shard 0 primary at {procs['primary']['address']}" in msg
    assert f"shard 0 replica at {procs['replica']['address']}" in msg
    assert "dropped it at step 1" in msg and "resume_run_id" in msg
