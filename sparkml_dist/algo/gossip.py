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


# -- asynchronous push-sum ------------------------------------------------------------------
# Asynchronous gradient-push (Assran & Rabbat 2021, "Asynchronous Gradient-Push", IEEE TAC):
# every rank, at its own pace, keeps half of its (x, w) and sends the other half to one
# out-peer; whatever arrives is added on arrival. No rank waits for another; the sums of x and
# of w over ranks and messages in flight are conserved, and z = x / w still de-biases.


def push_target(out_peers: tuple[int, ...], push_index: int) -> int:
    """The out-peer of a rank's ``push_index``-th asynchronous push: its out-peers in turn."""
    if not out_peers:
        raise ValueError("a rank with no out-peers cannot push (a 1-rank job has no gossip)")
    return out_peers[push_index % len(out_peers)]


PUSH_FLOOR = 0.5
"""A rank pushes only while its weight is at least this (the weights start at 1 and sum to the
world size): a rank that runs ahead of its peers would otherwise halve its weight at every step
with nothing coming back, and its de-biased model ``x / w`` would become ill-conditioned (on
digits, after a resume, ``w`` fell to 2e-4 and the loss exploded). Holding keeps the rank's
mass, so conservation is untouched, and bounds every weight below by ``PUSH_FLOOR / 2``."""


def may_push(weight: float) -> bool:
    """Whether a rank with push-sum weight ``weight`` may push now (:data:`PUSH_FLOOR`)."""
    return weight >= PUSH_FLOOR


def halve(numerator: torch.Tensor, weight: torch.Tensor) -> None:
    """Keep half of ``(x, w)`` in place; the other half (equal to the kept one: halving a float
    is exact) is what the rank sends. Mass ``x + sent`` is conserved bitwise."""
    numerator.mul_(0.5)
    weight.mul_(0.5)


def apply_update(numerator: torch.Tensor, weight: torch.Tensor, before: torch.Tensor,
                 after: torch.Tensor) -> torch.Tensor:
    """Asynchronous gradient-push's local step: the optimizer moved the de-biased model from
    ``before`` to ``after`` (``z = x / w``); that update is added to ``x`` unscaled (``x <- x -
    lr * grad f(z)`` in the paper), so the network average ``sum x / sum w`` moves by the mean
    of the ranks' updates whatever their weights. Returns the new de-biased model ``x / w``
    (``numerator`` is updated in place)."""
    numerator.add_(after - before)
    return numerator / weight
