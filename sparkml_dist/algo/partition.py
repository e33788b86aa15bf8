"""Model-parallel planning: stage splits, the rank mesh and the ideal pipeline bubble. Pure:
no torch, no I/O.

- :func:`balanced_split` splits an ordered list of layers into ``p`` contiguous, non-empty stages
  minimising the largest stage's parameter count (the linear-partition problem, solved exactly
  by dynamic programming), as GPipe balances its partitions (Huang et al. 2019, "GPipe: Efficient
  Training of Giant Neural Networks using Pipeline Parallelism", NeurIPS, section 2.2).
- :func:`named_split` splits at the layers a user names (each name starts a stage).
- :class:`Mesh` maps ranks onto a ``data x pipeline x tensor`` grid, ``rank = (d * P + s) * T +
  t``: the stages of one pipeline replica (and the shards of one tensor group) are neighbours.
- :func:`ideal_bubble` is the idle share ``(p - 1) / (m + p - 1)`` of a synchronous pipeline of
  ``p`` equal stages and ``m`` micro-batches, for GPipe (Huang et al. 2019, section 2.3) and for
  1F1B, which keeps the same bubble while holding at most ``p`` micro-batches' activations
  (Narayanan et al. 2019, "PipeDream: Generalized Pipeline Parallelism for DNN Training", SOSP;
  Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM", SC, section 2.2); with ``v`` interleaved chunks per rank it is
  ``(p - 1) / (v * m + p - 1)`` (ibid., section 2.2.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PlanError(ValueError):
    """A split or mesh that cannot be made; the message says what was given and expected."""


def balanced_split(sizes: Sequence[int], stages: int) -> tuple[int, ...]:
    """Start index of each of ``stages`` contiguous, non-empty groups of ``sizes`` that minimise
    the largest group sum; among equal maxima the earliest boundaries win (deterministic)."""
    n = len(sizes)
    if stages < 1:
        raise PlanError(f"a split needs at least 1 stage; got {stages}.")
    if stages > n:
        raise PlanError(f"{stages} stages need at least {stages} layers; the model has {n}.")
    if any(s < 0 for s in sizes):
        raise PlanError(f"layer sizes must be >= 0; got {list(sizes)}.")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][i]: the smallest largest-group sum splitting the first i layers into k groups.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    starts = []
    i = n
    for k in range(stages, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return tuple(reversed(starts))


def named_split(names: Sequence[str], boundaries: Sequence[str], stages: int) -> tuple[int, ...]:
    """Start index of each stage when stages 2..``stages`` begin at the layers ``boundaries``
    names (in model order)."""
    if len(boundaries) != stages - 1:
        raise PlanError(f"{stages} stages need {stages - 1} boundary layer name(s); got "
                        f"{len(boundaries)}: {list(boundaries)}.")
    index = {name: i for i, name in enumerate(names)}
    missing = [b for b in boundaries if b not in index]
    if missing:
        raise PlanError(f"boundary layer(s) {missing} are not top-level layers of the model; its "
                        f"layers are: {', '.join(names)}.")
    starts = (0, *(index[b] for b in boundaries))
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise PlanError(f"boundary layers {list(boundaries)} must be distinct, in model order, "
                        f"and not the first layer ({names[0]!r}); the layers are: "
                        f"{', '.join(names)}.")
    return starts


def stage_ranges(starts: Sequence[int], n: int) -> list[range]:
    """The layer indices of each stage, from the stages' start indices and the layer count."""
    ends = (*starts[1:], n)
    return [range(a, b) for a, b in zip(starts, ends)]


def ideal_bubble(stages: int, micro_batches: int, virtual: int = 1) -> float:
    """Idle share ``(p - 1) / (v * m + p - 1)`` of ``p`` equal stages fed ``m`` micro-batches,
    each rank holding ``v`` interleaved chunks (``v = 1``: GPipe and 1F1B)."""
    if stages < 1 or micro_batches < 1 or virtual < 1:
        raise PlanError(f"stages, micro-batches and virtual stages must be >= 1; got {stages}, "
                        f"{micro_batches} and {virtual}.")
    return (stages - 1) / (virtual * micro_batches + stages - 1)


@dataclass(frozen=True)
class Mesh:
    """A ``data x pipeline x tensor`` grid of ranks, ``rank = (d * pipeline + s) * tensor + t``."""

    data: int
    """Model replicas (gradients are averaged across them)."""
    pipeline: int
    """Pipeline stages per replica."""
    tensor: int
    """Tensor-parallel shards per stage."""

    def __post_init__(self) -> None:
        for name in ("data", "pipeline", "tensor"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PlanError(f"mesh.{name} must be an int >= 1; got {v!r}.")

    @property
    def size(self) -> int:
        """Ranks in the mesh."""
        return self.data * self.pipeline * self.tensor

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(d, s, t)`` of ``rank``."""
        if not 0 <= rank < self.size:
            raise PlanError(f"rank {rank} is outside a mesh of {self.size} ranks.")
        ds, t = divmod(rank, self.tensor)
        d, s = divmod(ds, self.pipeline)
        return d, s, t

    def rank_of(self, d: int, s: int, t: int) -> int:
        """The rank at ``(d, s, t)``."""
        return (d * self.pipeline + s) * self.tensor + t

    def pipeline_ranks(self, d: int, t: int) -> tuple[int, ...]:
        """Ranks of replica ``d``'s stages (shard ``t``), first stage first."""
        return tuple(self.rank_of(d, s, t) for s in range(self.pipeline))

    def data_ranks(self, s: int, t: int) -> tuple[int, ...]:
        """Ranks holding stage ``s``, shard ``t`` in every replica (they average gradients)."""
        return tuple(self.rank_of(d, s, t) for d in range(self.data))

    def tensor_ranks(self, d: int, s: int) -> tuple[int, ...]:
        """Ranks sharing stage ``s`` of replica ``d`` by tensor parallelism."""
        return tuple(self.rank_of(d, s, t) for t in range(self.tensor))

    def reader(self, d: int) -> int:
        """The rank that reads replica ``d``'s data shard: its first stage, shard 0."""
        return self.rank_of(d, 0, 0)

    def shards_of_rank(self) -> tuple[tuple[int, ...], ...]:
        """Data layout: shard ``d`` is read by :meth:`reader` ``(d)``; other ranks read none."""
        readers = {self.reader(d): d for d in range(self.data)}
        return tuple((readers[r],) if r in readers else () for r in range(self.size))

    def describe(self) -> str:
        """``data x pipeline x tensor``, e.g. ``2x2x1``."""
        return f"{self.data}x{self.pipeline}x{self.tensor}"
