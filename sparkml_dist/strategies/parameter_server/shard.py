"""One server shard's state: its parameters, the job's optimizer over them, the workers' clocks,
the mode's rule for answering pulls, and what it measured. No sockets (see :mod:`.server`).

Every method is called under the shard's lock; :meth:`Shard.wait_pull` waits on its condition,
bounded by ``timeout_s``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparkml_dist.algo.ps import StalenessHistogram, is_cut, pull_ready
from sparkml_dist.config import OptimizerConfig
from sparkml_dist.training.optim import lr_factor, make_optimizer


MAX_EVENTS = 100_000
"""Events a shard keeps for the run's ``ps/events.json`` (later ones are counted, not kept)."""


class PullTimeout(TimeoutError):
    """A pull waited ``timeout_s`` for other workers."""


@dataclass(frozen=True)
class ShardSpec:
    """What a shard is started with (written by the driver to a local file, read with
    ``torch.load(weights_only=True)`` as a plain dict; see :meth:`to_dict`)."""

    shard: int
    role: str
    """``primary`` or ``replica``."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    mode: str
    staleness: int
    num_workers: int
    optimizer: dict[str, Any]
    """:class:`OptimizerConfig` fields."""
    steps_per_epoch: int
    total_steps: int
    timeout_s: float
    replica: tuple[str, int] | None = None
    """The replica this primary forwards every push to (chain replication)."""
    cut_every: int = 0
    """``checkpoint.every_steps`` (cuts also fall on every epoch's end)."""
    cut_dir: str | None = None
    """Where the shard writes its state at each cut (None: no checkpoints)."""

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "role": self.role, "names": list(self.names),
                "shapes": [list(s) for s in self.shapes], "mode": self.mode,
                "staleness": self.staleness, "num_workers": self.num_workers,
                "optimizer": dict(self.optimizer), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "timeout_s": self.timeout_s,
                "replica": list(self.replica) if self.replica else None,
                "cut_every": self.cut_every, "cut_dir": self.cut_dir}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ShardSpec:
        return ShardSpec(shard=int(d["shard"]), role=str(d["role"]), names=tuple(d["names"]),
                         shapes=tuple(tuple(int(x) for x in s) for s in d["shapes"]),
                         mode=str(d["mode"]), staleness=int(d["staleness"]),
                         num_workers=int(d["num_workers"]), optimizer=dict(d["optimizer"]),
                         steps_per_epoch=int(d["steps_per_epoch"]),
                         total_steps=int(d["total_steps"]), timeout_s=float(d["timeout_s"]),
                         replica=tuple(d["replica"]) if d.get("replica") else None,
                         cut_every=int(d.get("cut_every", 0)), cut_dir=d.get("cut_dir"))


class Shard:
    """Parameters of one shard and the rule that orders pulls and pushes."""

    def __init__(self, spec: ShardSpec, values: list[torch.Tensor],
                 restore: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.params = [torch.nn.Parameter(v.detach().clone().to(torch.float32))
                       for v in values]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        cfg = OptimizerConfig(**spec.optimizer)
        self.opt = make_optimizer(cfg, self.params)
        # One schedule step per global step: per update in sync, per num_workers pushes else.
        per = 1 if spec.mode == "sync" else spec.num_workers
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda u: lr_factor(cfg, u // per, spec.steps_per_epoch, spec.total_steps))
        self.version = 0
        """Updates applied (sync: steps completed; async/ssp: pushes applied)."""
        self.clocks = [0] * spec.num_workers
        """Per worker: pushes received (its next step)."""
        self.pending: dict[int, dict[int, np.ndarray]] = {}
        self.previous: np.ndarray | None = None
        """sync: the parameters before the last update (a retried worker's pull of that step)."""
        self.cond = threading.Condition()
        self.hist = StalenessHistogram()
        self.events: list[dict[str, Any]] = []
        """Pulls answered and pushes received, in order (the first :data:`MAX_EVENTS`)."""
        self.stats = {"pushes": 0, "pulls": 0, "duplicates": 0, "bytes_in": 0, "bytes_out": 0,
                      "pull_wait_s": 0.0, "cut_s": 0.0}
        self.cuts_written: set[int] = set()
        if restore is not None:
            self._restore(restore)

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from a cut written by :meth:`_write_cut`."""
        vec = torch.as_tensor(state["values"], dtype=torch.float32)
        with torch.no_grad():
            offset = 0
            for p, n in zip(self.params, self.sizes):
                p.copy_(vec[offset:offset + n].reshape(p.shape))
                offset += n
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["sched"])
        self.version = int(state["version"])
        self.clocks = [int(c) for c in state["clocks"]]
        self.hist.merge({int(k): int(v) for k, v in state["staleness"].items()})
        self.cuts_written.add(int(state["step"]))

    def _write_cut(self, step: int) -> None:
        """Write this shard's state at cut ``step`` (every worker's clock is ``step``):
        ``<cut_dir>/shard<i>-step<k>.pt``, written to a temporary name and renamed."""
        assert self.spec.cut_dir is not None and all(c == step for c in self.clocks)
        t0 = time.monotonic()
        path = os.path.join(self.spec.cut_dir, f"shard{self.spec.shard}-step{step:09d}.pt")
        tmp = f"{path}.{self.spec.role}.tmp"
        torch.save({"step": step, "values": torch.from_numpy(self.vector()),
                    "optimizer": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "version": self.version, "clocks": list(self.clocks),
                    "staleness": {str(k): v for k, v in self.hist.counts.items()}}, tmp)
        os.replace(tmp, path)
        self.cuts_written.add(step)
        self.stats["cut_s"] += time.monotonic() - t0

    # -- values ----------------------------------------------------------------------------

    def vector(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).numpy().copy()

    def _apply(self, grad: np.ndarray) -> None:
        g = torch.from_numpy(grad)
        offset = 0
        for p, n in zip(self.params, self.sizes):
            p.grad = g[offset:offset + n].reshape(p.shape).clone()
            offset += n
        self.opt.step()
        self.sched.step()
        self.version += 1

    # -- the protocol's operations (caller holds self.cond) --------------------------------

    def wait_pull(self, worker: int, step: int) -> tuple[np.ndarray, int]:
        """The parameters for ``worker``'s ``step`` once the mode allows it, and the version
        they are at. Raises :class:`PullTimeout` after ``timeout_s``."""
        self._check_worker(worker)
        t0 = time.monotonic()
        deadline = t0 + self.spec.timeout_s
        spec = self.spec
        cut = spec.cut_dir is not None and is_cut(step, spec.steps_per_epoch, spec.cut_every,
                                                  spec.total_steps)
        while not (pull_ready(spec.mode, step, self.version, self.clocks, spec.staleness)
                   and (not cut or min(self.clocks) >= step)):
            left = deadline - time.monotonic()
            if left <= 0:
                slow = [w for w, c in enumerate(self.clocks)
                        if c == min(self.clocks)]
                raise PullTimeout(
                    f"worker {worker}'s pull for step {step} waited {self.spec.timeout_s:.0f} s "
                    f"(backend.timeout_s) in mode {self.spec.mode}: the slowest workers {slow} "
                    f"are at step {min(self.clocks)} (shard version {self.version}). Is every "
                    "worker task running (enough Spark task slots for training.num_workers)?")
            self.cond.wait(left)
        self.stats["pull_wait_s"] += time.monotonic() - t0
        self.stats["pulls"] += 1
        self._event("pull", worker, step)
        if cut and step not in self.cuts_written:
            self._write_cut(step)
        if self.spec.mode == "sync" and self.version > step:
            # A retried worker re-pulls a step this shard already completed.
            if self.version != step + 1 or self.previous is None:
                raise RuntimeError(f"worker {worker} pulled step {step} but shard "
                                   f"{self.spec.shard} is at version {self.version}")
            return self.previous.copy(), step
        return self.vector(), self.version

    def push(self, worker: int, step: int, pulled_version: int, grad: np.ndarray) -> bool:
        """Record ``worker``'s gradient for ``step``; False when it was a duplicate (a retried
        request whose first copy already arrived)."""
        self._check_worker(worker)
        if grad.size != self.numel:
            raise ValueError(f"push of {grad.size} values to shard {self.spec.shard}, which "
                             f"holds {self.numel}")
        clock = self.clocks[worker]
        if step < clock:
            self.stats["duplicates"] += 1
            return False
        if step > clock:
            raise RuntimeError(f"worker {worker} pushed step {step} but shard {self.spec.shard} "
                               f"expects its step {clock}")
        self.stats["pushes"] += 1
        self._event("push", worker, step)
        if self.spec.mode == "sync":
            self.hist.add(0)
            bucket = self.pending.setdefault(step, {})
            bucket[worker] = grad
            if len(bucket) == self.spec.num_workers:
                total = np.zeros(self.numel, np.float32)
                for w in range(self.spec.num_workers):  # fixed order: replicas sum alike
                    total += bucket[w]
                del self.pending[step]
                self.previous = self.vector()
                self._apply(total / np.float32(self.spec.num_workers))
        else:
            self.hist.add(max(0, self.version - pulled_version))
            self._apply(grad)
        self.clocks[worker] = step + 1
        self.cond.notify_all()
        return True

    def _event(self, op: str, worker: int, step: int) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append({"op": op, "worker": worker, "step": step,
                                "version": self.version, "t": time.time()})
        else:
            self.stats["events_dropped"] = self.stats.get("events_dropped", 0) + 1

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.spec.num_workers:
            raise ValueError(f"worker {worker} is not one of this job's "
                             f"{self.spec.num_workers} workers")

    def report(self) -> dict[str, Any]:
        """What the shard measured (JSON-able)."""
        return {"shard": self.spec.shard, "role": self.spec.role, "version": self.version,
                "clocks": list(self.clocks), "numel": self.numel,
                "staleness": {str(k): v for k, v in sorted(self.hist.counts.items())},
                **self.stats}
