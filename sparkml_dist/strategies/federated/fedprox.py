"""FedProx's client objective: local loss plus a proximal term that keeps the client near the
global model.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
Networks", MLSys 2020 (Eq. 2: h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2).

Torch only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def proximal_term(params: Iterable[torch.Tensor], anchor: Iterable[torch.Tensor],
                  mu: float) -> torch.Tensor:
    """``mu/2 * sum ||p - a||^2`` over matching tensors; ``anchor`` is the round's global model
    (detached). Differentiable in ``params``."""
    total: torch.Tensor | None = None
    for p, a in zip(params, anchor, strict=True):
        term = (p - a.detach()).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total
