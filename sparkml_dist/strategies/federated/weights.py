"""A model's floating-point state as one flat float32 vector, and back.

Federated updates, aggregation, clipping, noise and masking all work on this vector: every
floating-point entry of ``state_dict()`` (parameters and float buffers) in ``state_dict`` order.
Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) stay with the model.
"""

from __future__ import annotations

import torch
from torch import nn


def _float_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in model.state_dict(keep_vars=True).items()
            if torch.is_floating_point(v)]


def num_values(model: nn.Module) -> int:
    """Length of :func:`flatten`'s vector for this model."""
    return sum(v.numel() for _, v in _float_entries(model))


def flatten(model: nn.Module) -> torch.Tensor:
    """The model's float state as a new contiguous float32 vector (detached)."""
    parts = [v.detach().reshape(-1).to(torch.float32) for _, v in _float_entries(model)]
    return torch.cat(parts) if parts else torch.zeros(0)


def load_flat(model: nn.Module, vec: torch.Tensor) -> None:
    """Copy ``vec`` (as produced by :func:`flatten`) into the model's float state in place."""
    entries = _float_entries(model)
    expected = sum(v.numel() for _, v in entries)
    if vec.numel() != expected:
        raise ValueError(f"weight vector has {vec.numel()} values; the model has {expected}")
    offset = 0
    with torch.no_grad():
        for _, v in entries:
            n = v.numel()
            v.copy_(vec[offset:offset + n].reshape(v.shape).to(v.dtype))
            offset += n
