"""The communication seam: transport only.

A :class:`Communicator` moves tensors and small objects between the ranks of one attempt:
collectives, batched point-to-point exchange, subgroups and a 2-D device mesh. It knows nothing of
models or optimizers; how ranks cooperate is a strategy's business
(:mod:`sparkml_dist.strategies`). Every call is bounded by the backend's timeout.

A backend declares what it can do in :data:`BACKEND_CAPABILITIES` (readable on the driver without
importing the backend), and each strategy declares what it needs, so a mismatch fails before
launch (:func:`sparkml_dist.strategies.check_before_launch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

import torch


class Capability(StrEnum):
    """What a backend can do beyond the collectives every backend has."""

    P2P = "point-to-point send/recv"
    SUBGROUPS = "subgroups"
    MESH = "2-D device mesh (torch.distributed DeviceMesh)"
    DDP_HOOKS = "DDP communication hooks (gradient compression other than fp16)"
    FP16_COMPRESSION = "fp16 gradient compression"
    STORE = "a shared key/value store"


BACKEND_CAPABILITIES: dict[str, frozenset[Capability]] = {
    "torch": frozenset({Capability.P2P, Capability.SUBGROUPS, Capability.MESH,
                        Capability.DDP_HOOKS, Capability.FP16_COMPRESSION, Capability.STORE}),
    # Horovod has collectives only (process sets need declaring at init; no send/recv).
    "horovod": frozenset({Capability.FP16_COMPRESSION, Capability.STORE}),
}
"""``backend.name`` -> its capabilities (every backend has all_reduce, broadcast, all_gather,
all_gather_object, broadcast_object, barrier)."""

ReduceOp = Literal["sum", "avg", "max"]


@dataclass(frozen=True)
class Endpoint:
    """Where ranks meet: rank 0's host and a port it listens on, plus this rank's place."""

    rank: int
    world_size: int
    host: str
    port: int
    attempt: int
    """Launch attempt; namespaces the rendezvous so a relaunch never meets a stale one."""
    timeout_s: float
    """Bound on every collective."""


class Communicator(Protocol):
    """Transport between the ranks of one attempt; every call is bounded by ``timeout_s``."""

    rank: int
    world_size: int
    name: str
    device: torch.device
    capabilities: frozenset[Capability]
    timeout_s: float

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        """Reduce ``tensor`` across ranks in place (``sum``, ``avg`` or ``max``); return it."""

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy rank ``src``'s ``tensor`` to every rank in place and return it."""

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank."""

    def exchange(self, sends: Mapping[int, torch.Tensor],
                 recvs: Mapping[int, torch.Tensor]) -> None:
        """Send ``sends[peer]`` to each peer and receive into ``recvs[peer]`` from each, batched;
        returns when all are done. Needs :attr:`Capability.P2P`."""

    def new_group(self, ranks: Sequence[int]) -> Communicator | None:
        """A communicator over ``ranks`` (called by every rank with the same list, in the same
        order across groups); None on ranks outside it. Needs :attr:`Capability.SUBGROUPS`."""

    def device_mesh(self, shape: tuple[int, int], names: tuple[str, str]) -> Any:
        """A 2-D ``torch.distributed.DeviceMesh`` over all ranks. Needs :attr:`Capability.MESH`."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Leave the group; safe to call twice."""


def require(comm: Communicator, capability: Capability, who: str) -> None:
    """Raise a clear error if ``comm`` lacks ``capability`` (the driver checks this earlier)."""
    if capability not in comm.capabilities:
        raise NotImplementedError(f"{who} needs {capability.value}, which backend.name="
                                  f"{comm.name} does not provide; use backend.name=torch.")
