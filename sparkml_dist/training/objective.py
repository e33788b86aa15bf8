"""Loss and targets per task, shared by every strategy and the validation pass."""

from __future__ import annotations

import torch
from torch import nn


def loss_fn(task: str, reduction: str = "mean") -> nn.Module:
    """Cross-entropy for classification, mean squared error for regression."""
    if task == "classification":
        return nn.CrossEntropyLoss(reduction=reduction)
    return nn.MSELoss(reduction=reduction)


def prepare_target(y: torch.Tensor, out: torch.Tensor, task: str) -> torch.Tensor:
    """Class indices as int64, or regression targets shaped like the model's output."""
    if task == "classification":
        return y.long()
    return y.float().reshape(out.shape)
