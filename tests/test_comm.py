"""The transport seam on real processes: every Communicator operation on 3 gloo ranks (and the
collectives on Horovod), checked against what each rank must receive; waits are bounded."""

import datetime
import traceback

import pytest
import torch

from sparkml_dist.comm.base import BACKEND_CAPABILITIES, Capability
from tests.ranks import spawn_ranks
from tests.test_horovod_gloo import require_horovod


def _join(rank, world, port, backend, timeout_s=30.0):
    import torch.distributed as dist

    from sparkml_dist.comm.base import Endpoint
    from sparkml_dist.comm.factory import create_communicator
    from sparkml_dist.config import BackendConfig

    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s))
    ep = Endpoint(rank=rank, world_size=world, host="127.0.0.1", port=port, attempt=0,
                  timeout_s=timeout_s)
    return create_communicator(BackendConfig(name=backend, timeout_s=timeout_s), ep, store,
                               torch.device("cpu"))


def _collectives(comm):
    r, w = comm.rank, comm.world_size
    out = {}
    out["sum"] = comm.all_reduce(torch.tensor([float(r + 1)]), "sum").item()
    out["avg"] = comm.all_reduce(torch.tensor([float(r + 1)]), "avg").item()
    out["max"] = comm.all_reduce(torch.tensor([float(r * 10)]), "max").item()
    out["bcast"] = comm.broadcast(torch.tensor([float(r + 7)]), src=1).item()
    out["gather"] = [t.tolist() for t in comm.all_gather(torch.tensor([r, r * r]))]
    out["gather_obj"] = comm.all_gather_object({"rank": r})
    out["bcast_obj"] = comm.broadcast_object({"from": r}, src=w - 1)
    # what the resume agreement does: only the source has a value, the others pass None
    out["bcast_mixed"] = comm.broadcast_object(("ckpt-0000000010", None) if r == 0 else None, 0)
    comm.barrier()
    return out


def _torch_only(comm):
    r, w = comm.rank, comm.world_size
    out = {}
    right, left = (r + 1) % w, (r - 1) % w
    recv = {left: torch.empty(2)}
    comm.exchange({right: torch.tensor([float(r), 100.0 + r])}, recv)  # a ring shift
    out["ring"] = recv[left].tolist()
    sub = comm.new_group([0, 2])
    out["sub"] = None if sub is None else (sub.rank, sub.world_size,
                                           sub.all_reduce(torch.tensor([float(r)]), "sum").item())
    if sub is not None:
        out["sub_bcast"] = sub.broadcast(torch.tensor([float(r)]), src=1).item()
    mesh = comm.device_mesh((w, 1), ("dp", "tp"))
    out["mesh"] = (tuple(mesh.shape), mesh.get_local_rank("dp"), mesh.get_local_rank("tp"))
    try:
        comm.device_mesh((2, 2), ("dp", "tp"))
    except ValueError as exc:
        out["mesh_error"] = str(exc)
    return out


def _main(rank, world, port, backend, what, out):
    try:
        comm = _join(rank, world, port, backend)
        try:
            res = _collectives(comm)
            if what == "all":
                res.update(_torch_only(comm))
            if what == "timeout":
                t0 = __import__("time").monotonic()
                try:
                    if rank == 0:  # waits for a message rank 1 never sends
                        comm.exchange({}, {1: torch.empty(1)})
                    res["timeout"] = None
                except Exception as exc:  # noqa: BLE001 - the bounded wait is the point
                    res["timeout"] = (type(exc).__name__, __import__("time").monotonic() - t0)
        finally:
            if what != "timeout":
                comm.close()
        out.put((rank, "ok", res))
    except BaseException as exc:  # noqa: BLE001
        out.put((rank, "error", f"{exc}\n{traceback.format_exc()}"))


def _run(world, backend, what="all", timeout_s=120):
    res = spawn_ranks(_main, world, (backend, what), timeout_s)
    for rank, (status, payload) in res.items():
        assert status == "ok", f"rank {rank}: {status}: {payload}"
    return {rank: payload for rank, (_, payload) in res.items()}


def _check_collectives(res, world):
    for r in range(world):
        got = res[r]
        n = world * (world + 1) / 2
        assert got["sum"] == n and got["avg"] == n / world and got["max"] == 10.0 * (world - 1)
        assert got["bcast"] == 8.0
        assert got["gather"] == [[q, q * q] for q in range(world)]
        assert got["gather_obj"] == [{"rank": q} for q in range(world)]
        assert got["bcast_obj"] == {"from": world - 1}
        assert tuple(got["bcast_mixed"]) == ("ckpt-0000000010", None)


def test_torch_communicator_does_every_operation_on_three_gloo_ranks():
    res = _run(3, "torch")
    _check_collectives(res, 3)
    assert [res[r]["ring"] for r in range(3)] == [[2.0, 102.0], [0.0, 100.0], [1.0, 101.0]]
    assert res[1]["sub"] is None
    assert res[0]["sub"] == (0, 2, 2.0) and res[2]["sub"] == (1, 2, 2.0)
    assert res[0]["sub_bcast"] == 2.0 and res[2]["sub_bcast"] == 2.0  # src 1 of the group = rank 2
    assert [res[r]["mesh"] for r in range(3)] == [((3, 1), r, 0) for r in range(3)]
    assert "a 2x2 mesh needs 4 ranks; the job has 3" in res[0]["mesh_error"]


def test_point_to_point_wait_is_bounded_by_the_timeout():
    res = _run(2, "torch", "timeout", timeout_s=120)
    _check_collectives(res, 2)
    name, waited = res[0]["timeout"]
    assert waited < 60, f"waited {waited:.0f}s for a message that never came"


@pytest.mark.horovod
def test_horovod_communicator_collectives_and_declared_limits():
    require_horovod()
    _check_collectives(_run(3, "horovod", "collectives"), 3)
    have = BACKEND_CAPABILITIES["horovod"]
    assert Capability.P2P not in have and Capability.DDP_HOOKS not in have
    assert Capability.FP16_COMPRESSION in have
