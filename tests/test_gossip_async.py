"""Asynchronous gossip (``strategy.algorithm: async_push_sum``): push-sum's mass conserved under
any order of asynchronous pushes, a straggler slowing only itself (per-rank step rates the run
logs, against synchronous push-sum which the straggler holds back), allreduce's accuracy on
digits with the consensus distance shrinking and every cut holding all the mass, a killed rank's
job resuming from the last cut, the driver refusing what the variant does not support, and one
job with a straggler through ``fit`` on local Spark."""

import numpy as np
import pytest
import torch

from sparkml_dist.algo import gossip
from sparkml_dist.algo.topology import Topology
from sparkml_dist.config import JobConfig
from sparkml_dist.errors import ConfigError
from sparkml_dist.strategies import check_before_launch
from tests.ranks import run_ranks
from tests.test_compression import _ok
from tests.test_gossip import allreduce_accuracy, data, job  # noqa: F401 - fixtures, same job

# -- pure math ------------------------------------------------------------------------------


def test_async_pushes_in_any_order_conserve_mass_and_debias_to_the_average():
    """Ranks push half of (x, w) to an out-peer in a random order, messages are delivered late
    and out of order: the sums over ranks and messages in flight never change, and once all
    is delivered and mixed the de-biased values reach the initial average."""
    n = 5
    topo = Topology("ring", n)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(n, 4))
    x = [torch.from_numpy(r.copy()) for r in x0]
    w = [torch.ones(1, dtype=torch.float64) for _ in range(n)]
    pushes = [0] * n
    in_flight: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for _ in range(4000):
        r = int(rng.integers(n))
        if in_flight and rng.random() < 0.5:  # deliver a random message, late
            dst, mx, mw = in_flight.pop(int(rng.integers(len(in_flight))))
            x[dst] += mx
            w[dst] += mw
            continue
        dst = gossip.push_target(topo.out_peers(r), pushes[r])
        assert dst in topo.out_peers(r)
        pushes[r] += 1
        z_before = gossip.debias(x[r], w[r])
        gossip.halve(x[r], w[r])
        assert torch.equal(gossip.debias(x[r], w[r]), z_before)  # halving leaves z alone
        in_flight.append((dst, x[r].clone(), w[r].clone()))
        total_x = sum(x) + sum(m[1] for m in in_flight)
        total_w = sum(w) + sum(m[2] for m in in_flight)
        assert torch.allclose(total_x, torch.from_numpy(x0.sum(axis=0)), atol=1e-12)
        assert float(total_w) == pytest.approx(n, abs=1e-12)
    for dst, mx, mw in in_flight:
        x[dst] += mx
        w[dst] += mw
    for step in range(400):  # then rounds in turn, delivered at once
        for r in range(n):
            dst = gossip.push_target(topo.out_peers(r), step + r)
            gossip.halve(x[r], w[r])
            x[dst] += x[r]
            w[dst] += w[r]
    z = torch.stack([gossip.debias(a, b) for a, b in zip(x, w)]).numpy()
    assert np.allclose(z, x0.mean(axis=0), atol=1e-8)


def test_a_local_update_moves_the_network_average_unscaled():
    x, w = torch.tensor([2.0, 4.0]), torch.tensor([0.5])
    z = gossip.debias(x, w)
    new_z = gossip.apply_update(x, w, z, z + torch.tensor([0.1, -0.2]))
    assert torch.allclose(x, torch.tensor([2.1, 3.8]))
    assert torch.allclose(new_z, x / w)
    with pytest.raises(ValueError, match="no out-peers"):
        gossip.push_target((), 0)


# -- driver-side checks ---------------------------------------------------------------------


def _async(**extra) -> JobConfig:
    return JobConfig().replace(**{"strategy.kind": "gossip",
                                  "strategy.algorithm": "async_push_sum", **extra})


def test_driver_refuses_what_async_gossip_does_not_support_naming_the_setting():
    with pytest.raises(ConfigError, match=r"strategy.kind=gossip needs point-to-point send/recv, "
                       r"which backend.name=horovod does not provide"):
        check_before_launch(_async(**{"backend.name": "horovod"}))
    with pytest.raises(ConfigError, match=r"async_push_sum does not support "
                       r"training.early_stopping.*remove training.early_stopping"):
        check_before_launch(_async(**{"training.early_stopping": {"metric": "val/loss"}}))
    with pytest.raises(ConfigError, match=r"at every epoch end only; got "
                       r"checkpoint.every_steps=5. Set checkpoint.every_steps=0"):
        check_before_launch(_async(**{"checkpoint.every_steps": 5}))
    with pytest.raises(ConfigError, match=r"needs training.num_workers >= 2 \(got 1\)"):
        check_before_launch(_async(**{"training.num_workers": 1}))
    check_before_launch(_async(**{"training.num_workers": 2}))
    check_before_launch(_async(**{"checkpoint.every_steps": 5, "checkpoint.enabled": False}))
    with pytest.raises(ConfigError, match=r"strategy.algorithm: 'async' is not one of"):
        _async(**{"strategy.algorithm": "async"})


def test_an_injected_fault_the_job_stepped_past_still_strikes(monkeypatch):
    """An asynchronous rank sees the job's step jump (others stepped in between): with
    ``reached`` it dies at the first step at or past the injected one; the barrier loop's exact
    match stays exact, and another rank or attempt never dies."""
    import os

    from sparkml_dist.training.loop import _maybe_die

    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_)  # the test process must outlive the "fault"
    cfg = _async(**{"fault.inject": {"rank": 1, "step": 30}})
    for step in (28, 29):
        _maybe_die(cfg, 1, 0, step, reached=True)
    for rank, attempt in ((0, 0), (1, 1)):
        _maybe_die(cfg, rank, attempt, 31, reached=True)
    _maybe_die(cfg, 1, 0, 31)  # exact match only
    for step, reached in ((30, False), (30, True), (33, True)):
        with pytest.raises(SystemExit, match="17"):
            _maybe_die(cfg, 1, 0, step, reached=reached)


# -- real gloo ranks ------------------------------------------------------------------------


def async_job(**extra) -> JobConfig:
    return job(**{"strategy.kind": "gossip", "strategy.algorithm": "async_push_sum",
                  "strategy.topology": "ring", "backend.timeout_s": 30.0, **extra})


def _epoch_rows(res: dict) -> list[dict[str, float]]:
    return [m for _, m in res["sink"] if "gossip/rank_0/steps_per_s" in m]


def _check_cuts_hold_all_the_mass(ckpt_dir: str, world: int) -> list[str]:
    """Every complete checkpoint is a consistent cut: the ranks' push-sum weights sum to the
    world size (nothing in flight) and every rank's model is its de-biased numerator."""
    from sparkml_dist.training.checkpoint import load_part, part_file
    from sparkml_dist.training.local_store import DirectoryCheckpointStore

    store = DirectoryCheckpointStore(ckpt_dir)
    names = store.complete_names()
    for name in names:
        meta = store.read_meta(name)
        parts = [load_part(store, name, meta, part_file(r)) for r in range(world)]
        assert sum(float(p["weight"]) for p in parts) == pytest.approx(world, abs=1e-5), name
        for p in parts:
            flat = torch.cat([v.reshape(-1) for k, v in p["model"].items()])
            assert torch.allclose(flat, p["numerator"] / p["weight"], atol=1e-5)
    return names


def test_async_gossip_reaches_allreduce_accuracy_and_its_ranks_agree(data, allreduce_accuracy,
                                                                     tmp_path):
    res = _ok(run_ranks(async_job(), data, str(tmp_path)))
    acc = res["metrics"]["val/accuracy"]
    assert acc >= allreduce_accuracy - 0.015, f"{acc:.4f} vs allreduce {allreduce_accuracy:.4f}"
    rows = _epoch_rows(res)
    assert len(rows) == 6
    spread = [m["gossip/consensus_distance"] for m in rows]
    assert spread[0] > 0 and spread[-1] < spread[0] / 5, f"consensus distance {spread}"
    for m in rows:
        assert m["gossip/push_sum_weight_total"] == pytest.approx(4, abs=1e-5)
        assert m["gossip/messages_sent"] > 0 and m["comm/bytes_sent"] > 0
        assert 0 <= m["gossip/message_age_s"] < 30
        assert m["perf/epoch_samples"] >= 12 * 32 * 4  # the epoch's budget, job-wide
    assert len(_check_cuts_hold_all_the_mass(str(tmp_path), 4)) >= 1


def test_a_straggler_slows_only_itself_in_async_gossip_but_everyone_in_sync(data, tmp_path):
    delay = 0.03  # the straggler's steps take >= 30 ms; the others' a few ms
    slow = {"model.factory": "tests.factories:straggler_mlp",
            "model.kwargs": {"straggler": 1, "delay_s": delay, "hidden": [32]},
            "training.num_workers": 3, "training.epochs": 2, "checkpoint.enabled": False}
    res = _ok(run_ranks(async_job(**slow), data, str(tmp_path / "async")))
    for m in _epoch_rows(res):
        rates = [m[f"gossip/rank_{r}/steps_per_s"] for r in range(3)]
        assert rates[1] <= 1 / delay, rates
        assert min(rates[0], rates[2]) >= 1.5 * rates[1], f"steps/s per rank: {rates}"
        assert m["gossip/rank_0/steps"] > m["gossip/rank_1/steps"]  # fast ranks do more
    # Synchronous push-sum on the same graph: every step of every rank waits for the straggler.
    sync = _ok(run_ranks(job(**{**slow, "strategy.kind": "gossip",
                                "strategy.algorithm": "push_sum"}), data, str(tmp_path / "s")))
    step_s = [m["time/step_s"] for _, m in sync["sink"] if "time/step_s" in m]
    assert step_s and min(step_s) >= 0.9 * delay, step_s


def test_killed_rank_resumes_from_the_last_cut(data, allreduce_accuracy, tmp_path):
    cfg = async_job()
    first = run_ranks(cfg.replace(**{"fault.inject": {"rank": 1, "step": 30}}), data,
                      str(tmp_path))
    assert first[1] == ("died", 17) and all(first[r][0] == "error" for r in (0, 2, 3))
    for r in (0, 2):  # rank 1's ring neighbours name it (rank 3 then sees 0 and 2 go)
        assert "rank(s) [1] closed their connections" in first[r][1] \
            or "could not send to rank 1" in first[r][1], first[r][1][:600]
    cuts = _check_cuts_hold_all_the_mass(str(tmp_path), 4)
    assert cuts, "the killed run left no cut"
    second = _ok(run_ranks(cfg, data, str(tmp_path), attempt=1))
    steps = 12  # per epoch: 1437 training rows over 4 ranks, 32 a batch
    # Step 30 falls in epoch 3 however the ranks' paces split the epochs' budgets (rank 1 may
    # take 30 steps of its own within epoch 1): it dies there, after the cut of epoch 2.
    assert second["resumed_from"] == 2 * steps
    epochs = [m["progress/epoch"] for m in _epoch_rows(second)]
    assert epochs == list(range(second["resumed_from"] // steps + 1, 7))
    acc = second["metrics"]["val/accuracy"]
    assert acc >= allreduce_accuracy - 0.015, f"{acc:.4f} vs allreduce {allreduce_accuracy:.4f}"
    _check_cuts_hold_all_the_mass(str(tmp_path), 4)


# -- through Spark --------------------------------------------------------------------------


def test_async_gossip_job_through_fit_on_local_spark(spark, digits_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    from sparkml_dist import fit
    from sparkml_dist.strategies.gossip_async import RESUME_GUARANTEE
    from tests.test_fault_tolerance import ft_config

    df = spark.read.parquet(str(digits_path)).limit(800)
    result = fit(df, ft_config(tracking_uri, **{
        "strategy.kind": "gossip", "strategy.algorithm": "async_push_sum",
        "checkpoint.every_steps": 0, "model.factory": "tests.factories:straggler_mlp",
        "model.kwargs": {"straggler": 1, "delay_s": 0.02, "hidden": [64]}}))
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["sparkml_dist.resume_guarantee"] == RESUME_GUARANTEE
    assert run.data.tags["sparkml_dist.gossip.algorithm"] == "async_push_sum"
    rates = [[m.value for m in client.get_metric_history(result.run_id,
                                                         f"gossip/rank_{r}/steps_per_s")]
             for r in range(2)]
    assert len(rates[0]) == len(rates[1]) == 3  # one per epoch
    for fast, slow in zip(*rates):  # the straggler (rank 1, 20 ms a step) slows only itself
        assert fast >= 1.5 * slow, rates
    assert client.get_metric_history(result.run_id, "gossip/consensus_distance")
    assert result.metrics["val/accuracy"] > 0.5


def test_inbox_ignores_strangers_and_names_a_peer_that_left_mid_cut():
    import socket
    import time

    import numpy as np

    from sparkml_dist.strategies.gossip_async.mailbox import Inbox
    from sparkml_dist.strategies.parameter_server import wire

    secret = b"s" * 32
    inbox = Inbox(0, 4, secret, "127.0.0.1", timeout_s=30.0)
    try:
        with socket.create_connection(inbox.address) as s:  # a port scan, a health check
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with socket.create_connection(inbox.address):
            pass
        with socket.create_connection(inbox.address) as s:  # rank 1: one message, then gone
            wire.send(s, secret, {"src": 1, "w": 0.5, "seq": 0, "t": 0.0},
                      wire.to_bytes(np.ones(4, np.float32)))
        deadline = time.monotonic() + 10
        while inbox.received.get(1, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        x, w, n, _ = inbox.take()  # the strangers did not poison the inbox
        assert n == 1 and w == 0.5 and np.array_equal(x, np.ones(4, np.float32))
        assert inbox.lost_peers() == [1]
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=r"rank\(s\) \[1\] closed their connection"):
            inbox.wait_for({1: 2})  # its second message can never come: no 30 s wait
        assert time.monotonic() - t0 < 5
    finally:
        inbox.close()
