"""Ranks meet through Spark's ``BarrierTaskContext``: rank = partition id; rank 0 opens a store on a
free port and shares its address with ``allGather``. Every wait is bounded."""

from __future__ import annotations

import datetime
import json
import logging
import threading
from typing import Callable, TypeVar

from sparkml_dist.comm.base import Endpoint
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


def barrier_rendezvous(ctx, attempt: int, rendezvous_timeout_s: float, timeout_s: float
                       ) -> tuple[Endpoint, object]:
    """Meet the other ranks of this barrier stage.

    Returns this rank's :class:`Endpoint` and the ``torch.distributed`` store: rank 0 hosts a
    ``TCPStore`` on a port the OS picks, the others connect to it.
    """
    import torch.distributed as dist

    rank = ctx.partitionId()
    infos = ctx.getTaskInfos()
    world = len(infos)
    store = None
    message = ""
    if rank == 0:
        host = infos[0].address.rsplit(":", 1)[0]
        store = dist.TCPStore(host, 0, world, is_master=True,
                              timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
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
                    attempt=attempt, timeout_s=timeout_s), store
