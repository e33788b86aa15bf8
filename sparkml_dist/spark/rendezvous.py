"""Ranks meet through Spark's ``BarrierTaskContext``: rank = partition id; rank 0 opens a store on a
free port of its own executor address (not every interface) and shares that address with
``allGather``. The store is wrapped in a :class:`~sparkml_dist.comm.sealed_store.SealedStore`
keyed by the attempt's secret, so only the job's ranks can read or write rendezvous keys. Every
wait is bounded."""

from __future__ import annotations

import datetime
import json
import logging
import socket
import threading
from typing import Callable, TypeVar

from sparkml_dist.comm.base import Endpoint
from sparkml_dist.comm.sealed_store import SealedStore
from sparkml_dist.errors import RendezvousError

log = logging.getLogger(__name__)
R = TypeVar("R")


def bounded(fn: Callable[[], R], timeout_s: float, what: str) -> R:
    """Run ``fn`` in a helper thread; raise :class:`RendezvousError` if it takes too long."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=target, name=f"sparkml_dist-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise RendezvousError(f"{what} did not finish within {timeout_s:.0f}s; a peer rank is "
                              "probably stuck or lost. Raise backend.rendezvous_timeout_s if the "
                              "cluster is slow to start tasks.")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def listen_on(host: str) -> socket.socket:
    """A TCP socket listening on ``host`` (the executor's own address) at a port the OS picks."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr[:2] if family == socket.AF_INET else addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def host_store(host: str, world: int, timeout_s: float) -> object:
    """Rank 0's ``TCPStore``, listening on ``host`` only (torch's own default listens on every
    interface)."""
    import torch.distributed as dist

    sock = listen_on(host)
    try:
        store = dist.TCPStore(host, sock.getsockname()[1], world, is_master=True,
                              timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now
    return store


def barrier_rendezvous(ctx, attempt: int, rendezvous_timeout_s: float, timeout_s: float,
                       secret: str) -> tuple[Endpoint, SealedStore]:
    """Meet the other ranks of this barrier stage.

    Returns this rank's :class:`Endpoint` and the ``torch.distributed`` store: rank 0 hosts a
    ``TCPStore`` on its executor's address at a port the OS picks, the others connect to it;
    every rank uses it through a :class:`SealedStore` keyed by ``secret`` (the attempt's, from
    the driver).
    """
    import torch.distributed as dist

    rank = ctx.partitionId()
    infos = ctx.getTaskInfos()
    world = len(infos)
    store = None
    message = ""
    if rank == 0:
        host = infos[0].address.rsplit(":", 1)[0].strip("[]")
        store = host_store(host, world, timeout_s)
        message = json.dumps({"host": host, "port": store.port, "attempt": attempt})
    messages = bounded(lambda: ctx.allGather(message), rendezvous_timeout_s,
                       f"rendezvous of rank {rank} (allGather)")
    info = json.loads(messages[0])
    if info["attempt"] != attempt:
        raise RendezvousError(f"rank {rank} of attempt {attempt} met rank 0 of attempt "
                              f"{info['attempt']}")
    if store is None:
        store = bounded(lambda: dist.TCPStore(
            info["host"], info["port"], world, is_master=False,
            timeout=datetime.timedelta(seconds=timeout_s)),
            rendezvous_timeout_s, f"rank {rank} connecting to rank 0's store")
    log.info("rank %d/%d met rank 0 at %s:%d", rank, world, info["host"], info["port"])
    return Endpoint(rank=rank, world_size=world, host=info["host"], port=info["port"],
                    attempt=attempt, timeout_s=timeout_s), SealedStore(store, secret)
