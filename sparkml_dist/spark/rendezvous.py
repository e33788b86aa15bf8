"""Ranks meet through Spark's ``BarrierTaskContext``: rank = partition id; rank 0 opens a store on a
free port of its own executor address (not every interface) and the other ranks learn that
address in one of two ways (``backend.rendezvous``):

- on the driver's board (``driver``; ``auto`` under a local master): rank 0 posts it in a small
  store the driver opens at ``spark.driver.host`` for the attempt (:class:`DriverBoard`); the
  others wait for it there, which returns as soon as it is posted;
- through ``allGather`` (``barrier``; ``auto`` on a cluster and under Spark Connect), over
  Spark's own RPC. Spark's barrier calls poll in whole seconds: about 1 s a launch.

The store (and the board) are wrapped in a :class:`~sparkml_dist.comm.sealed_store.SealedStore`
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


def host_store(host: str, world: int | None, timeout_s: float) -> object:
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
                       secret: str, board: tuple[str, int] | None = None
                       ) -> tuple[Endpoint, SealedStore]:
    """Meet the other ranks of this barrier stage (through the driver's ``board`` at
    ``(host, port)`` when given, else ``allGather``).

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
    if board is not None:
        posted = _via_board(board, rank, attempt, message, secret, rendezvous_timeout_s)
    else:
        posted = bounded(lambda: ctx.allGather(message), rendezvous_timeout_s,
                         f"rendezvous of rank {rank} (allGather)")[0]
    info = json.loads(posted)
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


_BOARD_KEY = "rank0-store/attempt-{attempt}"


class DriverBoard:
    """The driver's board for one launch attempt: a ``TCPStore`` at the address executors reach
    the driver at, where the attempt's rank 0 posts its own store's address. Keys and values are
    sealed with the attempt's secret, so a client without it can neither read nor forge an
    address. :meth:`close` (or leaving a ``with`` block) stops it."""

    def __init__(self, host: str, timeout_s: float) -> None:
        self._store: object | None = host_store(host, None, timeout_s)
        self.address: tuple[str, int] = (host, self._store.port)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._store = None  # the server stops with its last reference

    def __enter__(self) -> DriverBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def driver_address(spark) -> str | None:
    """The address executors reach the driver at (``spark.driver.host``, resolved; IPv6 too), or
    None under Spark Connect (the client is not the driver), where Spark does not say, or where
    the name does not resolve here (logged)."""
    try:
        spark.sparkContext  # noqa: B018 - raises on Spark Connect
        host = spark.conf.get("spark.driver.host", None)
    except Exception:  # noqa: BLE001 - Spark Connect, or the key is hidden
        return None
    if not host:
        return None
    name = host.strip("[]")  # Spark writes IPv6 addresses in brackets
    try:
        return socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        log.warning("spark.driver.host=%s does not resolve on the driver: %s", host, exc)
        return None


def open_board(spark, mode: str, timeout_s: float, master: str = "") -> DriverBoard | None:
    """The attempt's :class:`DriverBoard` for ``backend.rendezvous=driver`` (and ``auto`` under
    a local master); None (ranks meet through ``allGather``) otherwise, under Spark Connect, or
    where the driver cannot listen at its address (logged)."""
    from sparkml_dist.spark.preflight import _master_is_local

    if mode == "barrier" or (mode == "auto" and not _master_is_local(master)):
        return None
    host = driver_address(spark)
    if host is None:
        log.info("ranks meet through BarrierTaskContext.allGather (no driver address: Spark "
                 "Connect, or spark.driver.host unset or unresolvable)")
        return None
    try:
        board = DriverBoard(host, timeout_s)
    except Exception as exc:  # noqa: BLE001 - the barrier path still works
        log.warning("could not open the rendezvous board at %s (%s: %s); ranks meet through "
                    "BarrierTaskContext.allGather, about 1 s slower. Set backend.rendezvous="
                    "barrier to skip this attempt.", host, type(exc).__name__, exc)
        return None
    log.info("ranks meet at the driver's rendezvous board %s:%d", *board.address)
    return board


BOARD_CONNECT_S = 15.0
"""Bound on a rank's connection to the driver's board (an unreachable port fails fast)."""


def _via_board(board: tuple[str, int], rank: int, attempt: int, message: str, secret: str,
               timeout_s: float) -> str:
    """Rank 0 posts ``message`` on the driver's board; the others wait (bounded) for it."""
    import torch.distributed as dist

    host, port = board
    key = _BOARD_KEY.format(attempt=attempt)
    connect_s = min(BOARD_CONNECT_S, timeout_s)
    try:
        raw = bounded(lambda: dist.TCPStore(host, port, None, is_master=False,
                                            timeout=datetime.timedelta(seconds=connect_s)),
                      connect_s + 5.0, f"rank {rank} connecting to the driver's board")
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do
        raise RendezvousError(
            f"rank {rank} could not connect to the driver's rendezvous board at {host}:{port} "
            f"within {connect_s:.0f} s ({type(exc).__name__}: {exc}). Executors must be able to "
            "open connections to the driver on any port for backend.rendezvous=driver; allow "
            "that, or set backend.rendezvous: barrier.") from None
    raw.set_timeout(datetime.timedelta(seconds=timeout_s))
    client = SealedStore(raw, secret)

    def exchange() -> str:
        if rank == 0:
            client.set(key, message)
            return message
        return client.get(key).decode()

    return bounded(exchange, timeout_s,
                   f"rendezvous of rank {rank} (rank 0's address on the driver's board at "
                   f"{host}:{port})")
