"""The contract every barrier-loop strategy keeps.

The shared loop (:func:`sparkml_dist.training.loop.train_rank`) owns the data order, metric
windows, checkpoint cadence and fault hooks. A strategy owns everything else: where the model and
optimizer live, what one training step does, what its checkpoint holds (state shared by all ranks,
written once by rank 0, plus each rank's own part), the metrics it adds, and the resume guarantee
it promises.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sparkml_dist.comm.base import Capability, Communicator
from sparkml_dist.config import JobConfig
from sparkml_dist.data.layout import DataLayout


@dataclass(frozen=True)
class RankContext:
    """What a strategy is built from on one rank."""

    cfg: JobConfig
    comm: Communicator
    device: torch.device
    in_features: int
    num_outputs: int
    steps_per_epoch: int
    total_steps: int


@dataclass
class StrategyState:
    """A strategy's checkpoint content on one rank."""

    shared: dict[str, Any] | None
    """State every rank holds identically (model, optimizer, schedule...); rank 0's is stored."""
    per_rank: dict[str, Any] | None = None
    """This rank's own state (error-feedback residuals...); None when it has none."""


class Strategy(ABC):
    """One way ranks cooperate. Subclasses set the class attributes and implement the methods."""

    kind: ClassVar[str]
    """``strategy.kind`` value."""
    resume_guarantee: ClassVar[str]
    """``bitwise`` or a sentence stating the weaker promise; logged as a run tag."""
    own_loop: ClassVar[Callable[..., tuple[dict[str, float], int]] | None] = None
    """A loop run in place of the shared barrier loop, with the shared loop's arguments (see
    :func:`sparkml_dist.training.loop.train_rank`), returning ``(last metrics, steps done)``;
    None (the default) for the shared loop. Asynchronous push-sum sets it: its ranks do not step
    together."""

    @classmethod
    def requirements(cls, cfg: JobConfig) -> dict[Capability, str]:
        """Backend capabilities this configuration needs -> the setting that needs each."""
        return {}

    @classmethod
    def check(cls, cfg: JobConfig) -> None:
        """Driver-side checks beyond capabilities; raise ConfigError naming the setting."""

    @classmethod
    def data_layout(cls, cfg: JobConfig, world_size: int) -> DataLayout:
        """Which shards each rank reads (default: one per rank)."""
        return DataLayout.one_per_rank(world_size)

    @classmethod
    def run_tags(cls, cfg: JobConfig) -> dict[str, str]:
        """MLflow tags the driver sets on the run for this strategy."""
        return {"sparkml_dist.strategy": cls.kind,
                "sparkml_dist.resume_guarantee": cls.resume_guarantee}

    @classmethod
    def fingerprint_of(cls, cfg: JobConfig) -> dict[str, Any]:
        """What a resumed job must match for this strategy's checkpoint to mean the same."""
        return {"kind": cls.kind}

    def probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Check user code locally on a first batch, before any collective (optional)."""

    @abstractmethod
    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's batch; return the loss (detached, on the device)."""

    @abstractmethod
    def eval_module(self) -> nn.Module:
        """The module validation runs through (the local replica, unwrapped)."""

    @abstractmethod
    def state(self) -> StrategyState:
        """The checkpoint content of this rank."""

    @abstractmethod
    def load_state(self, shared: dict[str, Any], per_rank: dict[str, Any] | None) -> None:
        """Restore from a checkpoint (called before :meth:`start`)."""

    def start(self) -> None:
        """Wire the model to the communicator (after any restore, before the first step)."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The current learning rate (for metrics)."""

    def take_metrics(self, steps: int) -> dict[str, float]:
        """Strategy metrics for the last ``steps`` steps (per-step averages); resets counters."""
        return {}

    def set_step(self, step: int) -> None:
        """Called before each step with its global index (e.g. for sampled timing)."""

    def rows_per_step(self, batch_size: int, world_size: int) -> int:
        """Training rows one step consumes over all ranks (for ``perf/samples_per_s``): every
        rank's batch, unless ranks share one (model parallelism)."""
        return batch_size * world_size

    def close(self) -> None:
        """Release what the strategy holds (hooks, threads)."""
