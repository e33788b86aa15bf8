"""Parameter-server math: placing parameters on server shards, the stale-synchronous clock rule,
and staleness bookkeeping. Pure: torch/numpy-free Python, no sockets, no clocks.

- Sharding: parameters are placed greedily, largest first, on the currently lightest shard (the
  LPT rule of Graham 1969), so shards differ in size by at most the largest parameter.
- Modes (:data:`MODES`):

  * ``sync``: bulk-synchronous (BSP). A shard applies the mean of all workers' gradients for a
    step once every worker has pushed it; a pull for step ``c`` waits for version ``c``.
  * ``async``: Downpour SGD (Dean et al. 2012, "Large Scale Distributed Deep Networks") as in
    Li et al. 2014 ("Scaling Distributed Machine Learning with the Parameter Server", OSDI):
    each push is applied on arrival; no worker ever waits for another.
  * ``ssp``: Stale Synchronous Parallel (Ho et al. 2013, "More Effective Distributed ML via a
    Stale Synchronous Parallel Parameter Server"): pushes are applied on arrival, and a worker at
    clock ``c`` (``c`` pushes done) may start its next step iff ``c - min_clock <= s``, where
    ``min_clock`` is the slowest worker's clock. ``s = 0`` is BSP.

- Staleness of a push: how many updates the shard applied between the worker's pull and its push
  (0 under ``sync``); :class:`StalenessHistogram` counts them.
- Checkpoints are consistent cuts (:func:`is_cut`): every shard at one logical step, every
  worker's data position that step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MODES = ("sync", "async", "ssp")


def shard_parameters(sizes: Mapping[str, int] | Sequence[tuple[str, int]], num_shards: int
                     ) -> list[list[str]]:
    """Place named parameters of the given sizes (element counts) on ``num_shards`` servers.

    Greedy largest-first: each parameter, in decreasing size (ties by name), goes to the shard
    with the fewest elements so far (ties: the lowest shard id). Every shard must receive at
    least one parameter. Returns, per shard, its parameter names in the model's order.
    """
    items = list(sizes.items()) if isinstance(sizes, Mapping) else list(sizes)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1; got {num_shards}.")
    if len(items) < num_shards:
        raise ValueError(f"{num_shards} server shards for a model with {len(items)} parameter "
                         f"tensors: every shard needs at least one. Lower "
                         f"strategy.num_servers to at most {len(items)}.")
    order = {name: i for i, (name, _) in enumerate(items)}
    load = [0] * num_shards
    placed: list[list[str]] = [[] for _ in range(num_shards)]
    for name, size in sorted(items, key=lambda kv: (-kv[1], kv[0])):
        target = min(range(num_shards), key=lambda s: (load[s], s))
        placed[target].append(name)
        load[target] += size
    return [sorted(names, key=order.__getitem__) for names in placed]


def may_proceed(clock: int, clocks: Sequence[int], staleness: int) -> bool:
    """The SSP rule: a worker at ``clock`` may start its next step iff
    ``clock - min(clocks) <= staleness`` (``clocks``: every worker's clock, its own included)."""
    return clock - min(clocks) <= staleness


def pull_ready(mode: str, step: int, version: int, clocks: Sequence[int], staleness: int) -> bool:
    """Whether a pull for ``step`` (the worker's clock) may be answered now.

    ``version``: updates a ``sync`` shard has applied (one per step); ``clocks``: every worker's
    clock (pushes received). ``sync`` needs ``version >= step``; ``ssp`` the clock rule;
    ``async`` never waits.
    """
    if mode == "sync":
        return version >= step
    if mode == "ssp":
        return may_proceed(step, clocks, staleness)
    if mode == "async":
        return True
    raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")


@dataclass
class StalenessHistogram:
    """Counts of push staleness (updates applied to a shard between a worker's pull and push)."""

    counts: dict[int, int] = field(default_factory=dict)

    def add(self, staleness: int) -> None:
        if staleness < 0:
            raise ValueError(f"staleness cannot be negative; got {staleness}.")
        self.counts[staleness] = self.counts.get(staleness, 0) + 1

    def merge(self, other: StalenessHistogram | Mapping[int, int]) -> None:
        """Add another histogram's counts (e.g. another shard's)."""
        counts = other.counts if isinstance(other, StalenessHistogram) else other
        for k, v in counts.items():
            self.counts[int(k)] = self.counts.get(int(k), 0) + int(v)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def mean(self) -> float:
        n = self.total
        return sum(k * v for k, v in self.counts.items()) / n if n else 0.0

    def max(self) -> int:
        return max(self.counts) if self.counts else 0

    def quantile(self, q: float) -> int:
        """The smallest staleness ``k`` with at least a share ``q`` of pushes at or below it."""
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1]; got {q}.")
        need, seen = q * self.total, 0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if seen >= need:
                return k
        return 0


def ssp_violations(events: Sequence[Mapping[str, int]], num_workers: int, staleness: int
                   ) -> list[dict[str, int]]:
    """Check a shard's event log against the SSP bound.

    ``events`` in the order the shard handled them: ``{"op": "push", "worker", "step"}`` (push
    of ``step`` received) and ``{"op": "pull", "worker", "step"}`` (pull for ``step`` answered).
    A pull for step ``c`` is a violation when some worker had pushed fewer than ``c - staleness``
    steps at that moment. Returns the violating pulls with the slowest clock then.
    """
    clocks = [0] * num_workers
    bad = []
    for e in events:
        if e["op"] == "push":
            clocks[e["worker"]] = max(clocks[e["worker"]], e["step"] + 1)
        elif e["op"] == "pull" and not may_proceed(e["step"], clocks, staleness):
            bad.append({"worker": e["worker"], "step": e["step"], "min_clock": min(clocks)})
    return bad


def is_cut(step: int, steps_per_epoch: int, every_steps: int, total_steps: int) -> bool:
    """Whether global step ``step`` is a checkpoint cut: each epoch's end, and every
    ``every_steps`` steps when > 0; never step 0 or the last (the final state is read
    directly). At a cut every worker has pushed exactly ``step`` steps and no more: a pull for
    ``step`` is held until the slowest worker has pushed ``step - 1``, in every mode, so all
    shards stand at one logical step together (a consistent cut, Chandy and Lamport 1985)."""
    if step <= 0 or step >= total_steps:
        return False
    return step % steps_per_epoch == 0 or (every_steps > 0 and step % every_steps == 0)
