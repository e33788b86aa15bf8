"""Start Horovod over Gloo inside processes that are already running.

``horovodrun`` normally launches the workers itself (via ssh or local
fork) and hands each one its rank through environment variables. Spark
barrier tasks are already running when training starts, so this module does
the launcher's remaining jobs by hand:

1. Rank 0 calls :func:`start_rendezvous_server`, which starts Horovod's own
   HTTP rendezvous server (the key/value store Gloo uses to find its peers)
   and returns its port. Rank 0 shares ``(address, port)`` with the other
   ranks through whatever channel the caller has (e.g.
   ``BarrierTaskContext.allGather``).
2. Every rank calls :func:`init_horovod`, which sets the environment
   variables Horovod's Gloo controller reads (see :func:`horovod_env`) and
   calls ``hvd.init()``.

Host layout. Horovod builds three Gloo contexts: global, local (ranks with
the same ``HOROVOD_HOSTNAME``) and cross (ranks with the same local rank).
Every rank and the server must agree on that layout, otherwise the local or
cross rendezvous never completes and ``hvd.init()`` times out. By default
all ranks are treated as one host named ``host``/``hostname`` (local rank ==
global rank). That is always consistent and correct for communication, but
on a multi-machine cluster pass ``hostnames`` (the host of every rank, in
rank order, identical on all ranks and on the server) so that local ranks
are real per-machine ranks, e.g. for choosing a GPU with
``hvd.local_rank()``.

Horovod is imported lazily, so this module imports without it; the
functions that need it raise ``ImportError`` pointing at
``scripts/build_horovod.sh``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "SlotAssignment",
    "assign_slots",
    "gloo_interface_for",
    "horovod_env",
    "init_horovod",
    "start_rendezvous_server",
    "stop_rendezvous_server",
]

_BUILD_HINT = (
    "Horovod (with PyTorch and Gloo support) is not importable; "
    "build and install it with scripts/build_horovod.sh"
)


@dataclass(frozen=True)
class SlotAssignment:
    """Placement of one rank; field names match Horovod's ``SlotInfo``."""

    hostname: str
    rank: int
    local_rank: int
    cross_rank: int
    size: int
    local_size: int
    cross_size: int


def _check_world(world_size: int, hostnames: Sequence[str] | None) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if hostnames is not None and len(hostnames) != world_size:
        raise ValueError(
            f"hostnames has {len(hostnames)} entries but world_size is {world_size}"
        )


def assign_slots(hostnames: Sequence[str]) -> list[SlotAssignment]:
    """Compute local and cross ranks for ranks ``0..len(hostnames)-1``.

    ``hostnames[r]`` is the host of global rank ``r``. The numbering follows
    Horovod's allocation plan: hosts are ordered by first appearance; a
    rank's local rank is its position among the ranks of its host; its cross
    rank is the position of its host among the hosts that have that local
    rank. Global ranks are kept as given (they need not be contiguous per
    host); when they are, the result equals Horovod's own plan.

    Args:
        hostnames: host of every rank, in rank order.

    Returns:
        One :class:`SlotAssignment` per rank, in rank order.
    """
    if not hostnames:
        raise ValueError("hostnames must not be empty")
    for name in hostnames:
        if not name or "/" in name:
            # The name becomes part of a rendezvous URL path.
            raise ValueError(f"invalid hostname for Horovod rendezvous: {name!r}")

    local_ranks: list[int] = []
    per_host: dict[str, int] = {}
    for name in hostnames:
        local_ranks.append(per_host.get(name, 0))
        per_host[name] = local_ranks[-1] + 1

    # Hosts with at least k+1 ranks take part in cross context k, in host order.
    host_order = list(per_host)  # dicts keep first-appearance order
    size = len(hostnames)
    slots = []
    for rank, (name, local_rank) in enumerate(zip(hostnames, local_ranks)):
        peers = [h for h in host_order if per_host[h] > local_rank]
        slots.append(
            SlotAssignment(
                hostname=name,
                rank=rank,
                local_rank=local_rank,
                cross_rank=peers.index(name),
                size=size,
                local_size=per_host[name],
                cross_size=len(peers),
            )
        )
    return slots


def _plan_hostnames(world_size: int, host: str, hostnames: Sequence[str] | None) -> list[str]:
    _check_world(world_size, hostnames)
    return list(hostnames) if hostnames is not None else [host] * world_size


def start_rendezvous_server(
    world_size: int, host: str, hostnames: Sequence[str] | None = None
) -> tuple[object, int]:
    """Start Horovod's HTTP rendezvous server; call on rank 0 only.

    The server listens on all interfaces on a free port and runs in a
    daemon thread of the calling process, which must stay alive until every
    rank has finished ``hvd.init()`` (in practice: until training ends).

    Args:
        world_size: number of ranks that will join.
        host: host name shared by all ranks (they must pass the same value
            as ``hostname`` to :func:`horovod_env`); ignored when
            ``hostnames`` is given.
        hostnames: optional host of every rank, in rank order (see module
            docstring); must be the same list every rank passes.

    Returns:
        ``(server, port)``; stop the server with :func:`stop_rendezvous_server`.
    """
    try:
        from horovod.runner.common.util.hosts import SlotInfo
        from horovod.runner.http.http_server import RendezvousServer
    except ImportError as exc:
        raise ImportError(_BUILD_HINT) from exc

    plan = [
        SlotInfo(**asdict(slot))
        for slot in assign_slots(_plan_hostnames(world_size, host, hostnames))
    ]
    server = RendezvousServer(verbose=0)
    port = server.start()
    # init() registers the scope sizes so the server can clear each
    # rendezvous scope once all of its members are done with it.
    server.init(plan)
    logger.info(
        "Horovod rendezvous server listening on port %d for %d rank(s) on %d host(s)",
        port,
        world_size,
        len({slot.hostname for slot in plan}),
    )
    return server, port


def stop_rendezvous_server(server: Any) -> None:
    """Stop a server returned by :func:`start_rendezvous_server` and free its port."""
    server.stop()
    httpd = getattr(server, "_httpd", None)  # RendezvousServer.stop() leaves it open
    if httpd is not None:
        httpd.server_close()
    logger.info("Horovod rendezvous server stopped")


def gloo_interface_for(addr: str) -> str | None:
    """Name of the local network interface used to reach ``addr``.

    Gloo binds to one interface (``HOROVOD_GLOO_IFACE``); without it Gloo
    uses the address this machine's hostname resolves to, which is often a
    loopback address (e.g. ``127.0.1.1`` on Debian) that other machines
    cannot reach. The interface that routes to the rendezvous server is the
    one the other ranks can reach too. No packet is sent.

    Returns:
        The interface name, or ``None`` if it cannot be determined.
    """
    try:
        infos = socket.getaddrinfo(addr, None, proto=socket.IPPROTO_UDP)
    except OSError as exc:
        logger.warning("cannot resolve rendezvous address %r: %s", addr, exc)
        return None
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                # connect() on UDP only selects the route and source address.
                sock.connect((sockaddr[0], 9))
                local_ip = ipaddress.ip_address(sock.getsockname()[0].split("%")[0])
        except (OSError, ValueError):
            continue
        iface = _interface_with_ip(local_ip)
        if iface is not None:
            return iface
    return None


def _interface_with_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    try:
        import psutil  # a Horovod runtime dependency
    except ImportError:
        if ip.is_loopback:
            return "lo"
        return None
    for name, addrs in psutil.net_if_addrs().items():
        for snic in addrs:
            if snic.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                if ipaddress.ip_address(snic.address.split("%")[0]) == ip:
                    return name
            except ValueError:
                continue
    return None


def horovod_env(
    rank: int,
    world_size: int,
    addr: str,
    port: int,
    hostname: str,
    timeout_s: float,
    *,
    hostnames: Sequence[str] | None = None,
    iface: str | None = None,
) -> dict[str, str]:
    """Environment variables that make ``hvd.init()`` join the rendezvous.

    Args:
        rank: this process's global rank, ``0 <= rank < world_size``.
        world_size: total number of ranks.
        addr: address of the rendezvous server, reachable from this process.
        port: port returned by :func:`start_rendezvous_server`.
        hostname: this rank's host name; must equal the server's ``host``
            (or ``hostnames[rank]``).
        timeout_s: Gloo timeout, for the rendezvous and for each collective
            (``HOROVOD_GLOO_TIMEOUT_SECONDS``, whole seconds, rounded up).
        hostnames: optional host of every rank; same list as the server's.
        iface: network interface for Gloo; detected from the route to
            ``addr`` when omitted (left unset if that fails).

    Returns:
        Variable name -> value.
    """
    _check_world(world_size, hostnames)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if not 0 < port < 65536:
        raise ValueError(f"invalid rendezvous port {port}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if hostnames is not None and hostnames[rank] != hostname:
        raise ValueError(
            f"hostname {hostname!r} of rank {rank} differs from hostnames[{rank}]="
            f"{hostnames[rank]!r}"
        )

    slot = assign_slots(_plan_hostnames(world_size, hostname, hostnames))[rank]
    env = {
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(max(1, math.ceil(timeout_s))),
        "HOROVOD_HOSTNAME": slot.hostname,
        "HOROVOD_RANK": str(slot.rank),
        "HOROVOD_SIZE": str(slot.size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank),
        "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank),
        "HOROVOD_CROSS_SIZE": str(slot.cross_size),
    }
    if iface is None:
        iface = gloo_interface_for(addr)
        if iface is None:
            logger.warning(
                "could not find the interface that reaches %s; Gloo will bind to the "
                "address of this machine's hostname", addr
            )
    if iface:
        env["HOROVOD_GLOO_IFACE"] = iface
    return env


def init_horovod(
    rank: int,
    world_size: int,
    addr: str,
    port: int,
    hostname: str,
    timeout_s: float,
    *,
    hostnames: Sequence[str] | None = None,
    iface: str | None = None,
) -> None:
    """Initialise ``horovod.torch`` in this process via the rendezvous server.

    Sets :func:`horovod_env`'s variables in ``os.environ`` (process-wide;
    fine for a Spark Python worker) and calls ``hvd.init()``, which blocks
    until all ``world_size`` ranks have joined or ``timeout_s`` passes. If
    Horovod is already initialised in this (reused) process it is shut down
    first. Arguments are those of :func:`horovod_env`.

    Raises:
        ImportError: Horovod is not installed.
        RuntimeError: ``hvd.init()`` failed, or Horovod reports a rank or
            size different from the requested one.
    """
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ImportError(_BUILD_HINT) from exc

    env = horovod_env(
        rank, world_size, addr, port, hostname, timeout_s, hostnames=hostnames, iface=iface
    )
    if hvd.is_initialized():
        logger.info("Horovod already initialised in this process; shutting it down first")
        hvd.shutdown()
    os.environ.update(env)
    logger.info(
        "rank %d/%d: hvd.init() via rendezvous %s:%d (hostname=%s local_rank=%s iface=%s)",
        rank, world_size, addr, port, hostname, env["HOROVOD_LOCAL_RANK"],
        env.get("HOROVOD_GLOO_IFACE", "<unset>"),
    )
    try:
        hvd.init()
    except Exception as exc:
        raise RuntimeError(
            f"hvd.init() failed on rank {rank}/{world_size} "
            f"(rendezvous {addr}:{port}, timeout {env['HOROVOD_GLOO_TIMEOUT_SECONDS']} s): {exc}"
        ) from exc

    if hvd.rank() != rank or hvd.size() != world_size:
        got = (hvd.rank(), hvd.size())
        hvd.shutdown()
        raise RuntimeError(
            f"Horovod initialised with rank {got[0]} of size {got[1]}, expected rank "
            f"{rank} of size {world_size}; HOROVOD_CONTROLLER=gloo may be unsupported "
            "by this Horovod build (check hvd.gloo_built())"
        )
    logger.info(
        "rank %d/%d: Horovod ready (local %d/%d, cross %d/%d)",
        hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(),
        hvd.cross_rank(), hvd.cross_size(),
    )
