"""The rendezvous store listens on the executor's own address only, and only holders of the
attempt's secret can read, write or join it; interface and encryption settings."""

import datetime
import multiprocessing as mp
import os

import psutil
import pytest
import torch
import torch.distributed as dist

from sparkml_dist.comm.factory import socket_env
from sparkml_dist.comm.horovod import gloo_iface, horovod_tuning_env
from sparkml_dist.comm.sealed_store import SealedStore, new_secret
from sparkml_dist.config import JobConfig
from sparkml_dist.driver_checks import check_encryption
from sparkml_dist.errors import ConfigError, RendezvousError
from sparkml_dist.spark.rendezvous import DriverBoard, _via_board, host_store, open_board
from tests.ranks import spawn_ranks

TIMEOUT = datetime.timedelta(seconds=20)


def _listeners(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def _other_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


def test_store_listens_on_the_given_address_only():
    store = host_store("127.0.0.1", 2, 10.0)
    assert _listeners(store.port) == {"127.0.0.1"}  # torch's default listens on every interface
    other = _other_address()
    if other is not None:  # reachable on its own address, refused on loopback
        outside = host_store(other, 2, 10.0)
        assert _listeners(outside.port) == {other}
        with pytest.raises(Exception):
            dist.TCPStore("127.0.0.1", outside.port, 2, is_master=False,
                          timeout=datetime.timedelta(seconds=2))


def test_the_driver_board_is_used_only_where_chosen():
    # auto: the board under a local master only (a cluster's executors may be firewalled from
    # the driver's other ports); barrier: never. Neither reads the session.
    assert open_board(None, "auto", 5.0, "spark://h:7077") is None
    assert open_board(None, "auto", 5.0, "yarn") is None
    assert open_board(None, "barrier", 5.0, "local[2]") is None
    with pytest.raises(ConfigError, match=r"backend\.rendezvous: 'gossip' is not one of 'auto', "
                                          r"'driver', 'barrier'"):
        JobConfig().replace(**{"backend.rendezvous": "gossip"})


def test_ranks_learn_rank_0s_address_from_the_driver_board_sealed_and_bounded():
    import threading
    import time

    board = DriverBoard("127.0.0.1", 10.0)
    assert _listeners(board.address[1]) == {"127.0.0.1"}
    secret = new_secret()
    got: dict[int, str] = {}

    def rank(r: int) -> None:  # rank 1 starts waiting before rank 0 posts
        got[r] = _via_board(board.address, r, 3, '{"host": "h", "port": 7}', secret, 10.0)

    waiter = threading.Thread(target=rank, args=(1,))
    waiter.start()
    time.sleep(0.3)
    rank(0)
    waiter.join(10)
    assert got == {0: '{"host": "h", "port": 7}', 1: '{"host": "h", "port": 7}'}
    # Another attempt's key, or the right key under another secret, is never read: the wait
    # ends at its bound with an error naming the board.
    for attempt, key in ((4, secret), (3, new_secret())):
        t0 = time.monotonic()
        with pytest.raises(RendezvousError, match=r"rendezvous of rank 1 \(rank 0's address on "
                                                  r"the driver's board at 127\.0\.0\.1:\d+\)"):
            _via_board(board.address, 1, attempt, "", key, 1.5)
        assert time.monotonic() - t0 < 6
    board.close()
    # A board the rank cannot reach (closed, or a firewalled port) fails within the connect
    # bound, naming the setting that avoids it.
    t0 = time.monotonic()
    with pytest.raises(RendezvousError, match=r"could not connect to the driver's rendezvous "
                                              r"board at 127\.0\.0\.1:\d+ within 2 s.*"
                                              r"backend\.rendezvous: barrier"):
        _via_board(board.address, 1, 3, "", secret, 2.0)
    assert time.monotonic() - t0 < 10


def _rank(rank: int, world: int, port: int, secrets: list[str], out: "mp.Queue") -> None:
    secret = secrets[rank]
    try:
        raw = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=TIMEOUT)
        store = SealedStore(raw, secret)
        dist.init_process_group("gloo", store=dist.PrefixStore("attempt-0", store), rank=rank,
                                world_size=2, timeout=datetime.timedelta(seconds=8))
        t = torch.full((3,), float(rank + 1))
        dist.all_reduce(t)
        dist.destroy_process_group()
        out.put((rank, "ok", t.tolist()))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, "error", f"{type(exc).__name__}: {exc}"))


def _run_ranks(port: int, secrets: list[str]) -> dict[int, object]:
    """Rank r joins the test's store at ``port`` with ``secrets[r]``: {rank: what it reported
    (the all-reduced values or its error), or its exit code if it died}."""
    res = spawn_ranks(_rank, len(secrets), (secrets,), timeout_s=120.0, port=port)
    return {r: payload for r, (_, payload) in res.items()}


def test_ranks_with_the_secret_train_and_an_outsider_reads_nothing():
    master = host_store("127.0.0.1", 3, 20.0)
    secret = new_secret()
    assert _run_ranks(master.port, [secret, secret]) == {0: [3.0] * 3, 1: [3.0] * 3}
    # What anyone who reaches the port sees: hashed names and ciphertext, no address, no port.
    outsider = dist.TCPStore("127.0.0.1", master.port, 3, is_master=False, timeout=TIMEOUT)
    keys = outsider.list_keys()
    assert keys and all(k.startswith("sparkml_dist/") and len(k) == 13 + 64 for k in keys)
    assert not any("rank" in k or "attempt" in k for k in keys)
    values = b"".join(outsider.get(k) for k in keys if outsider.check([k]))
    assert b"127.0.0.1" not in values
    # A wrong secret finds none of the ranks' keys; the right one does.
    SealedStore(master, secret).set("job/marker", "x")
    assert not SealedStore(outsider, new_secret()).check(["job/marker"])
    assert SealedStore(outsider, secret).get("job/marker") == b"x"


def test_a_value_written_without_the_secret_is_refused():
    master = host_store("127.0.0.1", 2, 10.0)
    secret = new_secret()
    rank = SealedStore(master, secret)
    rank.set("horovod/rendezvous", "10.0.0.5:4242")
    assert rank.get("horovod/rendezvous") == b"10.0.0.5:4242"
    outsider = dist.TCPStore("127.0.0.1", master.port, 2, is_master=False, timeout=TIMEOUT)
    (key,) = outsider.list_keys()
    outsider.set(key, b"\0" * 12 + b"evil.example:4242" + b"\0" * 16)  # redirect attempt
    with pytest.raises(RendezvousError, match="was not written with this attempt's secret"):
        rank.get("horovod/rendezvous")
    # Replaying a genuine sealed value under another key fails too (the key is authenticated).
    rank.set("host/0", "node-a")
    rank.set("host/1", "node-b")
    outsider.set(rank._key("host/1"), outsider.get(rank._key("host/0")))
    with pytest.raises(RendezvousError):
        rank.get("host/1")


def test_a_client_without_the_secret_cannot_join():
    master = host_store("127.0.0.1", 3, 20.0)
    results = _run_ranks(master.port, [new_secret(), new_secret()])
    # Each waits for a peer it never finds, within the bound, and no collective runs.
    assert all(isinstance(v, str) for v in results.values()), results


def test_secret_must_be_long_enough():
    with pytest.raises(ValueError, match="at least 128 bits"):
        SealedStore(dist.HashStore(), "abcd")


def test_socket_interface_setting():
    assert socket_env(JobConfig().backend) == {}
    cfg = JobConfig().replace(**{"backend.socket_ifname": "eth1,eth2"}).backend
    assert socket_env(cfg) == {"GLOO_SOCKET_IFNAME": "eth1,eth2", "NCCL_SOCKET_IFNAME": "eth1,eth2"}
    assert gloo_iface(cfg) == "eth1"
    excl = JobConfig().replace(**{"backend.socket_ifname": "^docker0"}).backend
    assert socket_env(excl)["NCCL_SOCKET_IFNAME"] == "^docker0" and gloo_iface(excl) is None
    for bad in ("", "eth0; rm -rf /", "eth0,,eth1"):
        with pytest.raises(ConfigError, match=r"backend\.socket_ifname must name network "):
            JobConfig().replace(**{"backend.socket_ifname": bad})


def test_horovod_stall_check_follows_the_collective_timeout():
    env = horovod_tuning_env(JobConfig().replace(**{"backend.timeout_s": 90.0}).backend)
    assert env["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "45"
    assert env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "90"
    tiny = horovod_tuning_env(JobConfig().replace(**{"backend.timeout_s": 0.5}).backend)
    assert int(tiny["HOROVOD_STALL_CHECK_TIME_SECONDS"]) < int(
        tiny["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"])


@pytest.mark.parametrize("key", ["spark.ssl.enabled", "spark.network.crypto.enabled"])
def test_encrypted_cluster_refuses_unencrypted_collectives_unless_allowed(key, caplog):
    conf = {key: "true"}.get
    with pytest.raises(ConfigError, match=rf"{key}=true.*backend\.allow_unencrypted=true"):
        check_encryption(JobConfig(), conf)
    check_encryption(JobConfig().replace(**{"backend.allow_unencrypted": True}), conf)
    assert "unencrypted" in caplog.text
    check_encryption(JobConfig(), {}.get)  # plain cluster: nothing to refuse
    check_encryption(JobConfig(), {key: "false"}.get)


def _horovod_rank(rank: int, world: int, port: int, secret: str, out: "mp.Queue") -> None:
    import socket

    from sparkml_dist.comm.base import Endpoint
    from sparkml_dist.comm.horovod import HorovodCommunicator, _StoreKV

    try:
        raw = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=TIMEOUT)
        store = SealedStore(raw, secret)
        ep = Endpoint(rank=rank, world_size=2, host="127.0.0.1", port=port, attempt=0,
                      timeout_s=30.0)
        cfg = JobConfig().replace(**{"backend.name": "horovod", "backend.timeout_s": 30.0}).backend
        comm = HorovodCommunicator(ep, torch.device("cpu"), cfg, store)
        comm.barrier()  # every rank's communicator is built (rank 0's included)
        host, server_port = _StoreKV(store, 0, rank, 10.0).get("rendezvous", "addr").rsplit(":", 1)
        try:
            socket.create_connection((host, int(server_port)), timeout=5).close()
            server = "still listening"
        except ConnectionRefusedError:
            server = "stopped"
        t = comm.all_reduce(torch.full((2,), float(rank + 1)), "sum")
        stall = os.environ.get("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")
        comm.close()
        out.put((rank, "ok", (server, t.tolist(), stall)))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, "error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.horovod
def test_horovod_joins_over_the_sealed_store_and_stops_its_rendezvous_server():
    master = host_store("127.0.0.1", 3, 30.0)
    results = spawn_ranks(_horovod_rank, 2, (new_secret(),), timeout_s=180.0, port=master.port)
    # Every rank passed hvd.init(): the HTTP rendezvous server no longer accepts connections.
    assert results == {r: ("ok", ("stopped", [3.0, 3.0], "30")) for r in range(2)}, results
