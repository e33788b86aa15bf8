"""Federated Averaging: the sample-weighted mean of client updates.

McMahan, Moore, Ramage, Hampson, Aguera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017 (Algorithm 1: w_{t+1} = sum_k n_k/n w^k_{t+1}).

Torch only. Updates are accumulated in float64 as they arrive, so a round over thousands of
clients never holds more than the running sum.
"""

from __future__ import annotations

import torch


class WeightedMean:
    """Running ``sum_k w_k u_k`` and ``sum_k w_k`` over client updates ``u_k``."""

    def __init__(self, size: int) -> None:
        self.total = torch.zeros(size, dtype=torch.float64)
        self.weight = 0.0
        self.count = 0

    def add(self, update: torch.Tensor, weight: float) -> None:
        """Add one client's update with its weight (its sample count in FedAvg)."""
        if update.numel() != self.total.numel():
            raise ValueError(f"update has {update.numel()} values; expected {self.total.numel()}")
        if weight < 0:
            raise ValueError(f"client weight must be >= 0; got {weight}")
        self.total += update.to(torch.float64).reshape(-1) * float(weight)
        self.weight += float(weight)
        self.count += 1

    def add_sum(self, weighted_sum: torch.Tensor, weight: float, count: int) -> None:
        """Add an already-summed ``sum_k w_k u_k`` (what secure aggregation reveals)."""
        self.total += weighted_sum.to(torch.float64).reshape(-1)
        self.weight += float(weight)
        self.count += int(count)

    def mean(self, denominator: float | None = None) -> torch.Tensor:
        """``total / sum of weights`` (or ``total / denominator``, e.g. the expected number of
        clients under DP), as float32."""
        div = self.weight if denominator is None else float(denominator)
        if div <= 0:
            raise ValueError("no client update to average (total weight is 0)")
        return (self.total / div).to(torch.float32)


def fedavg(updates: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sample-weighted mean of ``updates`` (one call form of :class:`WeightedMean`)."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update; got {len(updates)} updates and "
                         f"{len(weights)} weights")
    acc = WeightedMean(updates[0].numel())
    for u, w in zip(updates, weights):
        acc.add(u, w)
    return acc.mean()
