"""Data parallelism on the Horovod backend: ``hvd.DistributedOptimizer``'s hooks average the
gradients; the job's own torch optimizer applies them (see :class:`HorovodOptimizer`)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


class HorovodOptimizer:
    """The optimizer :func:`wrap_horovod` returns to the training loop.

    ``inner`` is the caller's torch optimizer: it keeps its state and param groups, so an LR
    scheduler built on it before wrapping keeps working, and ``state_dict()`` (what the loop
    checkpoints) is the inner one's, loadable by a plain optimizer. ``dist`` is the
    ``hvd.DistributedOptimizer`` made from it, used for what Horovod adds: its backward hooks start
    each gradient's allreduce (averaged, optionally fp16 on the wire) as soon as it is ready, and
    :meth:`step` waits for them with ``dist.synchronize()`` (timed: that wait is
    ``time/comm_s``) before ``inner.step()`` applies the update.

    With ``backward_passes_per_step = N > 1``, gradients of N consecutive loop steps accumulate
    locally; only every N-th :meth:`step` allreduces and updates, with the sum divided by N (the
    update of one global batch of N micro-batches per rank), and :meth:`zero_grad` clears only
    after an update. The LR schedule still counts loop steps, and a checkpoint taken between
    updates does not hold the partial sum: keep ``checkpoint.every_steps`` and the steps per epoch
    multiples of N for exact resumes.
    """

    def __init__(self, inner: torch.optim.Optimizer, dist: Any, passes_per_step: int) -> None:
        self.inner = inner
        self.dist = dist
        self.passes_per_step = passes_per_step
        self._pending = 0
        self.comm_s = 0.0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, unless a gradient accumulation is under way."""
        if self._pending == 0:
            # Horovod's zero_grad takes no argument (it sets to None) and refuses to run while
            # allreduces are pending; clearing in place instead is the inner optimizer's job.
            if set_to_none:
                self.dist.zero_grad()
            else:
                self.inner.zero_grad(set_to_none=False)

    def step(self, closure: Any = None) -> Any:
        """Wait for the gradient allreduces and apply the update (every N-th call)."""
        if closure is not None:
            raise ValueError("HorovodOptimizer.step does not take a closure")
        self._pending += 1
        if self._pending < self.passes_per_step:
            return None
        t0 = time.perf_counter()
        self.dist.synchronize()
        self.comm_s += time.perf_counter() - t0
        if self.passes_per_step > 1:
            with torch.no_grad():
                for group in self.inner.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.div_(self.passes_per_step)
        self._pending = 0
        return self.inner.step()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def take_comm_seconds(self) -> float:
        s, self.comm_s = self.comm_s, 0.0
        return s


def wrap_horovod(hvd: Any, comm: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                 compression: str, passes_per_step: int) -> HorovodOptimizer:
    """Copy rank 0's model and optimizer state to every rank; average gradients with Horovod.

    Called after any checkpoint restore, so the broadcast covers both a fresh start and a resume.
    """
    _broadcast_optimizer_state(hvd, comm, optimizer)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    wire = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
    dist_opt = hvd.DistributedOptimizer(
        optimizer, named_parameters=list(model.named_parameters()), compression=wire,
        backward_passes_per_step=passes_per_step, op=hvd.Average)
    return HorovodOptimizer(optimizer, dist_opt, passes_per_step)


def _broadcast_optimizer_state(hvd: Any, comm: Any, optimizer: torch.optim.Optimizer) -> None:
    """``hvd.broadcast_optimizer_state`` when there is state (a restored checkpoint).

    On a fresh optimizer Horovod would first create the state with a step on zero gradients,
    which counts an Adam step and applies weight decay: the run would then no longer match the
    torch backend. Fresh optimizers are identical on every rank anyway, so nothing is sent.
    """
    has = torch.tensor([1.0 if len(optimizer.state) else 0.0], dtype=torch.float64)
    with_state = int(comm.all_reduce(has, "sum").item())
    if with_state == 0:
        return
    if with_state != comm.world_size:
        raise RuntimeError(f"{with_state} of {comm.world_size} ranks restored optimizer state "
                           "from a checkpoint and the others did not; every rank must resume "
                           "from the same checkpoint")
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
