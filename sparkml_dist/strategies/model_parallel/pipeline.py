"""Pipeline stages: which layers a rank holds, and one training step through torch's schedules.

The model must be an ``nn.Sequential`` (its children run one after another, so any cut between
two children is a valid stage boundary); stage ``s`` is the ``nn.Sequential`` of its children,
under their original names, so a stage's ``state_dict`` keys are the whole model's. The split is
:func:`sparkml_dist.algo.partition.named_split` (``strategy.split_at``) or
:func:`~sparkml_dist.algo.partition.balanced_split` by parameter count.

Under ``interleaved_1f1b`` the model is cut into ``pipeline_stages x virtual_stages`` chunks and
rank ``s`` holds chunks ``s, s + p, ...`` (Narayanan et al. 2021, section 2.2.2), so the first
rank still feeds the features and the last rank computes the loss.

One step (:meth:`PipelineRunner.step`): the first stage sends the batch's labels to the last
stage (one small point-to-point message), then every stage runs ``ScheduleGPipe``,
``Schedule1F1B`` or ``ScheduleInterleaved1F1B`` over ``strategy.micro_batches`` micro-batches
with ``scale_grads=False`` and a micro-batch loss of ``sum / training.batch_size``, so the
accumulated gradients are those of the batch's mean loss, as in one process.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from sparkml_dist.algo.partition import PlanError, balanced_split, named_split, stage_ranges
from sparkml_dist.errors import ConfigError
from sparkml_dist.strategies.model_parallel.config import ModelParallelConfig
from sparkml_dist.training.objective import loss_fn, prepare_target


def layers_of(model: nn.Module, cfg: ModelParallelConfig, factory: str) -> list[tuple[str,
                                                                                       nn.Module]]:
    """The model's top-level layers, or a ConfigError when the model cannot be split."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"strategy.pipeline_stages={cfg.pipeline_stages} needs model.factory={factory} to "
            f"return an nn.Sequential (its children are the layers cut into stages); it returned "
            f"{type(model).__name__}, whose forward may not run its children in order. Return "
            "nn.Sequential(...) from the factory (e.g. sparkml_dist.models:deep_mlp), or set "
            "strategy.pipeline_stages=1.")
    return list(model.named_children())


def plan_stages(model: nn.Module, cfg: ModelParallelConfig, factory: str) -> list[range]:
    """The layer indices of each stage of ``model`` under ``cfg`` (ConfigError naming the
    setting when it cannot be done)."""
    layers = layers_of(model, cfg, factory)
    names = [n for n, _ in layers]
    p = cfg.chunks
    try:
        if cfg.split_at:
            starts = named_split(names, cfg.split_at, p)
        else:
            if p > len(layers):
                raise PlanError(f"the model ({factory}) has {len(layers)} top-level layers "
                                f"({', '.join(names)})")
            sizes = [sum(t.numel() for t in m.parameters()) for _, m in layers]
            starts = balanced_split(sizes, p)
    except PlanError as exc:
        setting = "strategy.split_at" if cfg.split_at else "strategy.pipeline_stages"
        what = f"{p} stages" if cfg.virtual_stages == 1 else \
            f"{p} stages (pipeline_stages x virtual_stages)"
        raise ConfigError(f"{setting}: cannot cut the model into {what}: {exc}. Lower "
                          "strategy.pipeline_stages to at most the layer count, name existing "
                          "layers in strategy.split_at, or use a deeper model (e.g. "
                          "model.kwargs.depth for sparkml_dist.models:deep_mlp).") from None
    return stage_ranges(starts, len(layers))


def stage_module(model: nn.Module, ranges: list[range], stage: int) -> nn.Sequential:
    """Stage ``stage`` of ``model``: its layers, sharing their parameters with ``model``."""
    layers = list(model.named_children())
    return nn.Sequential(OrderedDict(layers[i] for i in ranges[stage]))


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


class PipelineRunner:
    """One rank's stage of one pipeline replica: the torch stage and schedule, plus busy time
    and activation bytes for the bubble and traffic metrics."""

    def __init__(self, chunks: list[tuple[int, nn.Module]], position: int, ranks: int,
                 group: Any, cfg: ModelParallelConfig, batch_size: int, task: str,
                 device: torch.device) -> None:
        """``chunks``: (stage index, module) of each stage this rank holds (one, or
        ``virtual_stages`` under ``interleaved_1f1b``); ``position``: the rank's place among the
        ``ranks`` ranks of the pipeline (0 feeds the features, ``ranks - 1`` computes the
        loss)."""
        from torch.distributed.pipelining import (
            PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B)

        runner = self

        class TimedStage(PipelineStage):
            """torch's stage, timing its compute (forward and backward of each micro-batch)."""

            def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                out = super().forward_one_chunk(*args, **kwargs)
                runner.busy_s += time.perf_counter() - t0
                if not self.is_last:
                    runner.sent_bytes += _nbytes(out)
                return out

            def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                out = super().backward_one_chunk(*args, **kwargs)
                runner.busy_s += time.perf_counter() - t0
                return out

        self.position, self.ranks, self.task = position, ranks, task
        self.batch_size = batch_size
        self.busy_s = 0.0
        """Compute: forward and backward of every micro-batch (the strategy adds its optimizer
        step)."""
        self.wall_s = 0.0
        """The whole training step, waits included (kept by the strategy)."""
        self.sent_bytes = 0
        criterion = loss_fn(task, reduction="sum")

        def micro_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return criterion(out, prepare_target(target, out, task)) / batch_size

        stages = []
        for index, module in chunks:
            if index > 0:  # the gradient of each received activation goes back a stage
                module.register_forward_pre_hook(self._count_input)
            stages.append(TimedStage(module, index, cfg.chunks, device, group=group))
        if cfg.schedule == "interleaved_1f1b":
            self.schedule: Any = ScheduleInterleaved1F1B(stages, cfg.micro_batches,
                                                         loss_fn=micro_loss, scale_grads=False)
        else:
            kind = Schedule1F1B if cfg.schedule == "1f1b" else ScheduleGPipe
            self.schedule = kind(stages[0], cfg.micro_batches, loss_fn=micro_loss,
                                 scale_grads=False)

    def _count_input(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            self.sent_bytes += _nbytes(args)

    def step(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
        """Forward and backward of one batch over the micro-batches (gradients accumulate into
        the stage's parameters); the batch's mean loss on the last stage, else None."""
        losses: list[torch.Tensor] = []
        if self.position == 0:
            self.schedule.step(x)
        elif self.position == self.ranks - 1:
            self.schedule.step(target=y, losses=losses)
        else:
            self.schedule.step()
        return torch.stack(losses).sum().detach() if losses else None

    def take(self) -> tuple[float, float, int]:
        """(busy seconds, wall seconds, activation bytes sent) since the last call."""
        out = (self.busy_s, self.wall_s, self.sent_bytes)
        self.busy_s, self.wall_s, self.sent_bytes = 0.0, 0.0, 0
        return out
