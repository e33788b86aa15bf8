"""Top-k gradient sparsification with error feedback.

Each step a rank sends only the ``k`` entries of largest magnitude of ``g + e`` (its gradient plus
the residual ``e`` it kept from earlier steps), as (index, value) pairs, and keeps the rest as the
new residual, so nothing is lost, only delayed: Aji & Heafield, "Sparse Communication for
Distributed Gradient Descent" (EMNLP 2017); the error-feedback analysis is Stich, Cordonnier &
Jaggi, "Sparsified SGD with Memory" (NeurIPS 2018). Ranks exchange their pairs with all_gather
(each rank's k indices differ) and every rank scatters all of them into a dense sum.
"""

from __future__ import annotations

import math

import torch


def k_for(numel: int, ratio: float) -> int:
    """Entries kept of a tensor of ``numel`` entries: ``ceil(ratio * numel)``, at least 1."""
    return max(1, min(numel, math.ceil(ratio * numel)))


def compress(x: torch.Tensor, residual: torch.Tensor | None, k: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices int32, values, new_residual)`` for the 1-D gradient ``x``.

    With ``residual`` None there is no error feedback: the new residual is returned but callers
    drop it. Ties in magnitude are broken by ``torch.topk``'s deterministic order on CPU.
    """
    acc = x if residual is None else x + residual
    _, idx = torch.topk(acc.abs(), k, sorted=False)
    idx, _ = torch.sort(idx)  # a canonical order makes the payload independent of topk's
    values = acc[idx]
    new_residual = acc.clone()
    new_residual[idx] = 0
    return idx.to(torch.int32), values, new_residual


def decompress_mean(indices: list[torch.Tensor], values: list[torch.Tensor], numel: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense average of every rank's sparse contribution, added in rank order."""
    out = torch.zeros(numel, dtype=dtype, device=values[0].device)
    for idx, val in zip(indices, values):
        out.index_add_(0, idx.long(), val.to(dtype))
    return out.div_(len(values))


def wire_bytes(k: int, value_bytes: int = 4) -> int:
    """Bytes one rank contributes: k int32 indices and k values."""
    return k * (4 + value_bytes)
