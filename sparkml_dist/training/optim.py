"""Optimizer and learning-rate schedule from config."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from sparkml_dist.config import OptimizerConfig


_FUSED_DEVICES = ("cpu", "cuda")


def fusable(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused optimizer kernels take these parameters: plain (not a tensor
    subclass such as tensor parallelism's ``DTensor``, which the fused kernel refuses beside
    the optimizer's plain state tensors), dense, floating-point, on CPU or CUDA."""
    return bool(params) and all(
        type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()
        and not p.is_sparse and p.device.type in _FUSED_DEVICES for p in params)


def make_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]
                   ) -> torch.optim.Optimizer:
    """The configured ``torch.optim`` optimizer; its fused implementation when
    ``optimizer.fused`` is set and the parameters allow it (:func:`fusable`)."""
    params = list(params)
    kw: dict[str, object] = {"fused": True} if cfg.fused and fusable(params) else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, **kw)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


def lr_factor(cfg: OptimizerConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps (pure)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_size_epochs * steps_per_epoch))
    return 1.0


def make_scheduler(cfg: OptimizerConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch, total_steps))
