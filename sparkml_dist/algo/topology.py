"""Communication graphs for decentralized (gossip) training, their mixing matrices and spectral
gaps.

Topologies over ``n`` ranks:

- ``ring``: each rank talks to ``rank - 1`` and ``rank + 1`` (mod ``n``).
- ``torus``: ranks on a ``rows x cols`` grid (``rows`` the largest divisor of ``n`` not above
  ``sqrt(n)``), each talking to its four grid neighbours with wrap-around; a prime ``n`` gives a
  ``1 x n`` grid, i.e. a ring.
- ``exponential``: rank ``i`` sends to ``i + 2^k`` and receives from ``i - 2^k`` (mod ``n``) for
  every ``2^k < n`` (Assran et al. 2019, "Stochastic Gradient Push for Distributed Deep
  Learning", ICML, section 5 and appendix).
- ``random``: each round every rank sends to one other rank drawn uniformly, from a generator
  seeded by ``(seed, step)``, so every rank computes the same graph without talking.

Two mixing matrices per round, both with ``x_new = M @ x`` (row ``i`` says how rank ``i``
combines what it holds and receives):

- :func:`metropolis_matrix`: Metropolis-Hastings weights on the undirected graph (an edge where
  either end sends to the other), ``W[i, j] = 1 / (1 + max(d_i, d_j))``: symmetric and doubly
  stochastic for any graph, as D-PSGD needs (Lian et al. 2017, "Can Decentralized Algorithms
  Outperform Centralized Algorithms?", NeurIPS; Xiao & Boyd 2004, "Fast linear iterations for
  distributed averaging"). On a regular graph it is the uniform ``1 / (d + 1)``.
- :func:`push_sum_matrix`: the directed graph with each sender splitting its mass uniformly
  over itself and its out-peers, ``P[j, i] = 1 / (1 + |out_i|)``: column stochastic, as push-sum
  needs (Kempe, Dobra & Gehrke 2003; Assran et al. 2019).

:func:`spectral_gap` is ``1 - |lambda_2|`` (the second-largest eigenvalue modulus); a larger gap
mixes faster. For ``random`` one round's graph is sparse and changes every round, so
:func:`topology_gap` reports the gap of the expected matrix, estimated over a fixed, seeded set
of rounds.

numpy only: no torch, sockets or global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

TopologyName = Literal["ring", "torus", "exponential", "random"]
TOPOLOGIES: tuple[str, ...] = ("ring", "torus", "exponential", "random")
MixingKind = Literal["dpsgd", "push_sum"]


def torus_shape(n: int) -> tuple[int, int]:
    """``(rows, cols)`` of the grid for ``n`` ranks: ``rows`` the largest divisor <= sqrt(n)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def _random_targets(n: int, seed: int, step: int) -> np.ndarray:
    """Each rank's out-peer in round ``step``: uniform over the other ranks."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, step]))
    return (np.arange(n) + rng.integers(1, n, size=n)) % n


@dataclass(frozen=True)
class Topology:
    """A gossip graph over ``world_size`` ranks; ``seed`` matters for ``random`` only."""

    name: TopologyName
    world_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in TOPOLOGIES:
            raise ValueError(f"topology {self.name!r} is not one of {', '.join(TOPOLOGIES)}")
        if self.world_size < 1:
            raise ValueError(f"a topology needs at least 1 rank; got {self.world_size}")

    @property
    def static(self) -> bool:
        """True when the graph is the same every round."""
        return self.name != "random"

    def out_peers(self, rank: int, step: int = 0) -> tuple[int, ...]:
        """Ranks that ``rank`` sends to in round ``step`` (sorted, without ``rank``)."""
        n = self.world_size
        if n == 1:
            return ()
        if self.name == "ring":
            peers = {(rank - 1) % n, (rank + 1) % n}
        elif self.name == "torus":
            rows, cols = torus_shape(n)
            r, c = divmod(rank, cols)
            peers = {((r - 1) % rows) * cols + c, ((r + 1) % rows) * cols + c,
                     r * cols + (c - 1) % cols, r * cols + (c + 1) % cols}
        elif self.name == "exponential":
            peers = {(rank + 2 ** k) % n for k in range((n - 1).bit_length())}  # 2^k < n
        else:
            peers = {int(_random_targets(n, self.seed, step)[rank])}
        peers.discard(rank)
        return tuple(sorted(peers))

    def out_lists(self, step: int = 0) -> list[tuple[int, ...]]:
        """Every rank's out-peers in round ``step``."""
        if self.name == "random" and self.world_size > 1:
            targets = _random_targets(self.world_size, self.seed, step)
            return [(int(t),) for t in targets]
        return [self.out_peers(r, step) for r in range(self.world_size)]

    def in_peers(self, rank: int, step: int = 0) -> tuple[int, ...]:
        """Ranks that send to ``rank`` in round ``step`` (sorted)."""
        return tuple(j for j, outs in enumerate(self.out_lists(step)) if rank in outs)

    def neighbours(self, rank: int, step: int = 0) -> tuple[int, ...]:
        """The undirected neighbourhood: ranks that ``rank`` sends to or receives from."""
        return tuple(sorted(set(self.out_peers(rank, step)) | set(self.in_peers(rank, step))))


def adjacency(topology: Topology, step: int = 0) -> np.ndarray:
    """``A[i, j] = 1`` where rank ``i`` sends to rank ``j`` in round ``step``."""
    n = topology.world_size
    a = np.zeros((n, n))
    for i, outs in enumerate(topology.out_lists(step)):
        a[i, list(outs)] = 1.0
    return a


def metropolis_matrix(topology: Topology, step: int = 0) -> np.ndarray:
    """Symmetric, doubly stochastic D-PSGD mixing matrix of round ``step`` (module docstring)."""
    a = adjacency(topology, step)
    und = np.maximum(a, a.T)
    deg = und.sum(axis=1)
    w = und / (1.0 + np.maximum(deg[:, None], deg[None, :]))
    w[np.diag_indices_from(w)] = 1.0 - w.sum(axis=1)
    return w


def push_sum_matrix(topology: Topology, step: int = 0) -> np.ndarray:
    """Column-stochastic push-sum matrix of round ``step``: ``P[j, i] = 1 / (1 + |out_i|)`` for
    ``j`` in ``out_i`` or ``j == i``."""
    p = adjacency(topology, step).T + np.eye(topology.world_size)
    return p / p.sum(axis=0, keepdims=True)


def mixing_matrix(topology: Topology, kind: MixingKind, step: int = 0) -> np.ndarray:
    """The round-``step`` matrix that ``kind`` (``dpsgd`` or ``push_sum``) mixes with."""
    if kind == "dpsgd":
        return metropolis_matrix(topology, step)
    if kind == "push_sum":
        return push_sum_matrix(topology, step)
    raise ValueError(f"mixing kind {kind!r} is not one of dpsgd, push_sum")


def spectral_gap(matrix: np.ndarray) -> float:
    """``1 - |lambda_2|``: one minus the second-largest eigenvalue modulus (0 for one rank's
    1x1 matrix gives 1: nothing to mix)."""
    if matrix.shape[0] == 1:
        return 1.0
    mods = np.sort(np.abs(np.linalg.eigvals(matrix)))[::-1]
    return float(max(0.0, 1.0 - mods[1]))


def topology_gap(topology: Topology, kind: MixingKind, rounds: int = 512) -> float:
    """Spectral gap of the matrix ``kind`` mixes with; for ``random``, of its expectation,
    estimated as the mean of rounds ``0 .. rounds-1``."""
    if topology.static:
        return spectral_gap(mixing_matrix(topology, kind))
    mean = sum(mixing_matrix(topology, kind, s) for s in range(rounds)) / rounds
    return spectral_gap(mean)
