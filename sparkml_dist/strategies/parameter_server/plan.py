"""What a parameter-server job is made of, computed once on the driver: the initial model, the
parameters of each server shard, the shards' specs and the workers' task. No Spark here, so
tests drive servers and workers on loopback with exactly what the driver would use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparkml_dist.algo.ps import shard_parameters
from sparkml_dist.config import JobConfig, ParameterServerConfig
from sparkml_dist.data.sharding import steps_per_epoch
from sparkml_dist.errors import ConfigError
from sparkml_dist.strategies.parameter_server.client import Endpoint
from sparkml_dist.strategies.parameter_server.shard import ShardSpec
from sparkml_dist.strategies.parameter_server.worker import WorkerTask


@dataclass
class JobPlan:
    """The model (initialised from ``training.seed``) and how it is split over the servers."""

    model: torch.nn.Module
    groups: list[list[str]]
    """Parameter names per server shard, in model order."""
    specs: list[ShardSpec]
    steps_per_epoch: int
    total_steps: int

    @property
    def named(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    @property
    def sizes(self) -> list[int]:
        named = self.named
        return [sum(named[n].numel() for n in ns) for ns in self.groups]

    def initial_values(self) -> list[list[torch.Tensor]]:
        named = self.named
        return [[named[n].detach() for n in ns] for ns in self.groups]

    def state_from(self, values: list[np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` entries from the shards' flat values."""
        named = self.named
        out: dict[str, torch.Tensor] = {}
        for ns, vec in zip(self.groups, values):
            flat = torch.as_tensor(vec, dtype=torch.float32)
            offset = 0
            for n in ns:
                k = named[n].numel()
                out[n] = flat[offset:offset + k].reshape(named[n].shape).clone()
                offset += k
        return out

    def load(self, values: list[np.ndarray]) -> None:
        """Copy the shards' flat values into the model."""
        self.model.load_state_dict(self.state_from(values))


def plan_job(cfg: JobConfig, in_features: int, num_outputs: int,
             train_shard_sizes: list[int] | tuple[int, ...]) -> JobPlan:
    """Build the initial model (``torch.manual_seed(training.seed)`` first, as every strategy
    does) and shard its parameters over ``strategy.num_servers``."""
    from sparkml_dist.models import build_model

    ps = cfg.strategy
    if not isinstance(ps, ParameterServerConfig):
        raise ConfigError(f"a parameter-server plan needs strategy.kind=parameter_server; got "
                          f"{ps!r}")
    tc = cfg.training
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model.factory, in_features, num_outputs, cfg.model.kwargs)
    buffers = [n for n, b in model.named_buffers() if torch.is_floating_point(b)]
    if buffers:
        raise ConfigError(f"model {cfg.model.factory} has floating-point buffers {buffers[:5]} "
                          "(e.g. BatchNorm running statistics), which parameter servers do not "
                          "train. Use a model without them, or strategy.kind=data_parallel.")
    named = dict(model.named_parameters())
    groups = shard_parameters([(n, p.numel()) for n, p in named.items()], ps.num_servers)
    steps = steps_per_epoch(list(train_shard_sizes), tc.batch_size)
    specs = [ShardSpec(shard=i, role="primary", names=tuple(ns),
                       shapes=tuple(tuple(named[n].shape) for n in ns), mode=ps.mode,
                       staleness=ps.staleness if ps.mode == "ssp" else 0,
                       num_workers=tc.num_workers, optimizer=dataclasses.asdict(cfg.optimizer),
                       steps_per_epoch=steps, total_steps=steps * tc.epochs,
                       timeout_s=cfg.backend.timeout_s)
             for i, ns in enumerate(groups)]
    return JobPlan(model, groups, specs, steps, steps * tc.epochs)


def worker_task(plan: JobPlan, cfg: JobConfig, endpoints: list[list[Endpoint]], secret: bytes,
                in_features: int, num_outputs: int,
                layout_shards: tuple[tuple[int, ...], ...] = ()) -> WorkerTask:
    """The task every worker receives."""
    ps: Any = cfg.strategy
    inj = cfg.fault.inject
    return WorkerTask(
        factory=cfg.model.factory, model_kwargs=dict(cfg.model.kwargs), in_features=in_features,
        num_outputs=num_outputs, task=cfg.data.task, batch_size=cfg.training.batch_size,
        seed=cfg.training.seed, steps_per_epoch=plan.steps_per_epoch,
        total_steps=plan.total_steps, shard_names=tuple(tuple(ns) for ns in plan.groups),
        endpoints=tuple(tuple(e) for e in endpoints), secret=secret,
        timeout_s=cfg.backend.timeout_s,
        straggler_sleep_s={int(k): float(v) for k, v in ps.straggler_sleep_s.items()},
        layout_shards=layout_shards, shard_memory_mb=cfg.data.shard_memory_mb,
        spill_dir=cfg.data.spill_dir,
        crash=None if inj is None else (inj.rank, inj.step, inj.attempt))
