"""Tests for sparkml_dist.comm.horovod_gloo.

The end-to-end tests start the rendezvous server in the test process and two
worker subprocesses that join it with ``init_horovod`` and run allreduce.
They fail (not skip) when Horovod is missing: build it with
``scripts/build_horovod.sh``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparkml_dist.comm.horovod_gloo import (
    assign_slots,
    horovod_env,
    start_rendezvous_server,
    stop_rendezvous_server,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 180  # whole run of both workers, so a broken rendezvous never hangs
GLOO_TIMEOUT_S = 60.0

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import horovod.torch as hvd
    from sparkml_dist.comm.horovod_gloo import init_horovod

    rank, world, addr, port, hostname, hostnames = json.loads(sys.argv[1])
    init_horovod(rank, world, addr, port, hostname, timeout_s=%r, hostnames=hostnames)
    x = torch.tensor([rank + 1.0, 10.0 * (rank + 1), -2.0 * rank], dtype=torch.float64)
    summed = hvd.allreduce(x, op=hvd.Sum, name="sum")
    averaged = hvd.allreduce(x, op=hvd.Average, name="avg")
    gathered = hvd.allgather(torch.tensor([[float(rank)]]), name="gather")
    print("RESULT " + json.dumps({
        "rank": hvd.rank(), "size": hvd.size(),
        "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
        "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size(),
        "sum": summed.tolist(), "avg": averaged.tolist(),
        "gathered": gathered.flatten().tolist(),
    }), flush=True)
    hvd.shutdown()
    """
    % GLOO_TIMEOUT_S
)


def require_horovod() -> None:
    """Fail the calling test with build instructions if Horovod is unusable."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        error = str(exc)
    else:
        error = None
    if error is not None:  # failing outside `except` keeps the report short
        pytest.fail(
            f"horovod.torch is not importable ({error}); run scripts/build_horovod.sh "
            "to build and install Horovod 0.28.1 into this environment",
            pytrace=False,
        )
    if not hvd.gloo_built():
        pytest.fail(
            "Horovod was built without Gloo; rebuild it with scripts/build_horovod.sh",
            pytrace=False,
        )


def _run_workers(world: int, hostnames: list[str] | None) -> list[dict]:
    own_host = socket.gethostname()
    server, port = start_rendezvous_server(world, own_host, hostnames=hostnames)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    procs = []
    try:
        for rank in range(world):
            hostname = hostnames[rank] if hostnames else own_host
            args = json.dumps([rank, world, "127.0.0.1", port, hostname, hostnames])
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, args],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = []
        for rank, proc in enumerate(procs):
            try:
                out, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                details = "\n".join(
                    f"--- rank {r} ---\n{p.communicate()[0]}" for r, p in enumerate(procs)
                )
                pytest.fail(f"workers did not finish within {WORKER_TIMEOUT_S} s\n{details}")
            outputs.append(out)
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            details = "\n".join(f"--- rank {r} ---\n{outputs[r]}" for r in failed)
            pytest.fail(f"worker rank(s) {failed} failed\n{details}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stop_rendezvous_server(server)

    results = []
    for rank, out in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, f"rank {rank} printed no result:\n{out}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def _check_collectives(results: list[dict], world: int) -> None:
    inputs = [[r + 1.0, 10.0 * (r + 1), -2.0 * r] for r in range(world)]
    expected_sum = [sum(col) for col in zip(*inputs)]
    expected_avg = [s / world for s in expected_sum]
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        assert res["size"] == world
        assert res["sum"] == pytest.approx(expected_sum)
        assert res["avg"] == pytest.approx(expected_avg)
        assert res["gathered"] == pytest.approx([float(r) for r in range(world)])


def test_allreduce_two_workers_one_host() -> None:
    require_horovod()
    results = _run_workers(2, hostnames=None)
    _check_collectives(results, 2)
    assert [(r["local_rank"], r["local_size"]) for r in results] == [(0, 2), (1, 2)]
    assert [(r["cross_rank"], r["cross_size"]) for r in results] == [(0, 1), (0, 1)]


def test_allreduce_two_workers_two_named_hosts() -> None:
    """Two logical hosts on loopback: exercises the local and cross contexts."""
    require_horovod()
    results = _run_workers(2, hostnames=["host-a", "host-b"])
    _check_collectives(results, 2)
    assert [(r["local_rank"], r["local_size"]) for r in results] == [(0, 1), (0, 1)]
    assert [(r["cross_rank"], r["cross_size"]) for r in results] == [(0, 2), (1, 2)]


@pytest.mark.parametrize(
    "layout",
    [[("w0", 4)], [("w0", 2), ("w1", 2)], [("a", 3), ("b", 1), ("c", 2)]],
)
def test_assign_slots_matches_horovod_plan(layout: list[tuple[str, int]]) -> None:
    require_horovod()
    from horovod.runner.common.util.hosts import HostInfo, get_host_assignments

    size = sum(n for _, n in layout)
    theirs = get_host_assignments([HostInfo(h, n) for h, n in layout], size)
    ours = assign_slots([h for h, n in layout for _ in range(n)])
    assert [vars(s) for s in theirs] == [vars(s) for s in ours]


def test_assign_slots_interleaved_hosts() -> None:
    # Spark may give a host non-contiguous partition ids; global ranks are kept.
    slots = assign_slots(["a", "b", "a", "b", "a"])
    assert [s.rank for s in slots] == [0, 1, 2, 3, 4]
    assert [(s.local_rank, s.local_size) for s in slots] == [(0, 3), (0, 2), (1, 3), (1, 2), (2, 3)]
    assert [(s.cross_rank, s.cross_size) for s in slots] == [(0, 2), (1, 2), (0, 2), (1, 2), (0, 1)]


def test_horovod_env_single_host() -> None:
    env = horovod_env(1, 3, "127.0.0.1", 4321, "node", timeout_s=12.5)
    assert env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == "127.0.0.1"
    assert env["HOROVOD_GLOO_RENDEZVOUS_PORT"] == "4321"
    assert env["HOROVOD_CONTROLLER"] == "gloo"
    assert env["HOROVOD_CPU_OPERATIONS"] == "gloo"
    assert env["HOROVOD_GLOO_TIMEOUT_SECONDS"] == "13"
    assert env["HOROVOD_HOSTNAME"] == "node"
    assert (env["HOROVOD_RANK"], env["HOROVOD_SIZE"]) == ("1", "3")
    assert (env["HOROVOD_LOCAL_RANK"], env["HOROVOD_LOCAL_SIZE"]) == ("1", "3")
    assert (env["HOROVOD_CROSS_RANK"], env["HOROVOD_CROSS_SIZE"]) == ("0", "1")
    assert env.get("HOROVOD_GLOO_IFACE") == "lo"


def test_horovod_env_rejects_inconsistent_arguments() -> None:
    with pytest.raises(ValueError):
        horovod_env(2, 2, "127.0.0.1", 4321, "node", timeout_s=5)
    with pytest.raises(ValueError):
        horovod_env(0, 2, "127.0.0.1", 4321, "node", timeout_s=5, hostnames=["other", "node"])
    with pytest.raises(ValueError):
        horovod_env(0, 2, "127.0.0.1", 4321, "node", timeout_s=5, hostnames=["node"])
