"""Gossip averaging steps for decentralized SGD.

- D-PSGD (Lian et al. 2017, "Can Decentralized Algorithms Outperform Centralized Algorithms? A
  Case Study for Decentralized Parallel Stochastic Gradient Descent", NeurIPS): each rank takes a
  local SGD step, then replaces its parameters by ``sum_j W[i, j] x_j`` over itself and its
  neighbours, with ``W`` symmetric and doubly stochastic (here Metropolis-Hastings weights,
  :func:`sparkml_dist.algo.topology.metropolis_matrix`). This is the adapt-then-combine order:
  the local step comes first, then the average.
- Push-sum / Stochastic Gradient Push (Assran, Loizou, Ballas & Rabbat 2019, "Stochastic Gradient
  Push for Distributed Deep Learning", ICML): each rank holds a numerator ``x`` and a scalar
  weight ``w`` (both start at the shared initial value and 1); the gradient is taken at the
  de-biased ``z = x / w`` and applied to ``x``; then every rank sends ``(x, w)`` to its out-peers
  and sums what it receives with the column-stochastic weights
  (:func:`sparkml_dist.algo.topology.push_sum_matrix`). It needs only a directed graph; the sum of
  the ``x`` over ranks and the sum of the ``w`` (``n``) are conserved.

A round is planned from the topology alone (:func:`plan_round`), so every rank agrees on who
sends to whom without talking. Combining adds received tensors in rank order, so a replayed round
gives bitwise the same result.

torch and numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sparkml_dist.algo.topology import MixingKind, Topology, mixing_matrix


@dataclass(frozen=True)
class Round:
    """What one rank does in one gossip round."""

    send_to: tuple[int, ...]
    """Ranks this rank sends its tensor to."""
    recv_from: tuple[int, ...]
    """Ranks this rank receives a tensor from (sorted)."""
    self_weight: float
    """Weight of this rank's own tensor in the combination."""
    weights: Mapping[int, float]
    """Received rank -> the weight of its tensor."""


def plan_round(topology: Topology, kind: MixingKind, rank: int, step: int) -> Round:
    """Rank ``rank``'s part of round ``step``: row ``rank`` of the round's mixing matrix."""
    m = mixing_matrix(topology, kind, step)
    if kind == "dpsgd":
        send = recv = topology.neighbours(rank, step)
    else:
        send, recv = topology.out_peers(rank, step), topology.in_peers(rank, step)
    return Round(send_to=send, recv_from=recv, self_weight=float(m[rank, rank]),
                 weights={j: float(m[rank, j]) for j in recv})


def combine(own: torch.Tensor, rnd: Round, received: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``self_weight * own + sum_j weights[j] * received[j]``, summed in rank order (a new
    tensor; ``own`` is left alone)."""
    out = own * rnd.self_weight
    for j in rnd.recv_from:
        out.add_(received[j], alpha=rnd.weights[j])
    return out


def debias(numerator: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """Push-sum's estimate ``z = x / w`` of the average."""
    return numerator / weight


def consensus_distance(sum_x: torch.Tensor, sum_sq: float, n: int) -> tuple[float, float]:
    """Spread of ``n`` rank models from the sums of their flat parameters (``sum_x``) and of
    their squared norms (``sum_sq``), as one all_reduce gives them.

    Returns ``(mean_i ||x_i - mean||^2, that divided by ||mean||^2)``. Pass float64 sums: the
    formula subtracts two close numbers.
    """
    mean = sum_x / n
    mean_sq = float(mean.double().pow(2).sum())
    dist = max(0.0, float(sum_sq) / n - mean_sq)
    return dist, dist / max(mean_sq, 1e-30)
