"""The communication seam used by the training layer.

Everything the per-rank loop needs from a backend goes through :class:`Communicator`, so the loop
is the same for torch.distributed and Horovod. Every call is bounded by the backend's timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


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
    """Collectives and the model/optimizer wrapping a backend provides."""

    rank: int
    world_size: int
    name: str

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` across ranks in place and return it."""

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy rank ``src``'s ``tensor`` to every rank in place and return it."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer
             ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Make ``model``/``optimizer`` average gradients across ranks; sync initial state."""

    def comm_seconds(self) -> float:
        """Seconds spent in gradient communication since the last call (then reset)."""

    def close(self) -> None:
        """Leave the group; safe to call twice."""
