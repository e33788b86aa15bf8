"""Synchronous data parallelism: DDP on the torch backend, Horovod's optimizer on horovod.

Placement: every rank builds the whole model from the same seed and holds a full optimizer; rank
0's state is what the checkpoint stores. Step: forward, backward (gradients averaged across ranks
by the backend, compressed on the wire by a DDP hook when ``strategy.compression.name`` asks),
optimizer and schedule step. Checkpoint: model, optimizer, schedule and the resolved compressor
as shared state; each rank's compressor memory (top-k residuals, PowerSGD error/factors) as its
own part. Resume guarantee: bitwise, for every compressor.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from sparkml_dist.comm.base import Capability
from sparkml_dist.config import DataParallelConfig, JobConfig
from sparkml_dist.errors import USER_ERROR_MARKER, ConfigError, UserCodeError
from sparkml_dist.models import build_model
from sparkml_dist.strategies.base import RankContext, Strategy, StrategyState
from sparkml_dist.strategies.data_parallel import hooks
from sparkml_dist.training.objective import loss_fn, prepare_target
from sparkml_dist.training.optim import make_optimizer, make_scheduler

log = logging.getLogger(__name__)

_HOROVOD_COMPRESSION = ("none", "fp16")


def build_replica(ctx: RankContext) -> nn.Module:
    """The whole model, initialised from ``training.seed`` (identical on every rank)."""
    cfg = ctx.cfg
    torch.manual_seed(cfg.training.seed)
    try:
        return build_model(cfg.model.factory, ctx.in_features, ctx.num_outputs,
                           cfg.model.kwargs).to(ctx.device)
    except Exception as exc:  # noqa: BLE001 - a factory error is the user's to fix
        raise UserCodeError(f"{USER_ERROR_MARKER} model.factory {cfg.model.factory!r} failed: "
                            f"{type(exc).__name__}: {exc}") from exc


def user_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> None:
    """Run one local forward/backward before any collective; errors here are the user's.

    Runs in eval mode so batch-norm statistics are left untouched by the probe.
    """
    model.eval()
    try:
        out = model(x)
        loss = loss_fn(task)(out, prepare_target(y, out, task))
        loss.backward()
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise UserCodeError(f"{USER_ERROR_MARKER} the model failed on a batch of shape "
                            f"{tuple(x.shape)} (labels {tuple(y.shape)}, {y.dtype}): "
                            f"{type(exc).__name__}: {exc}. Check model.factory/model.kwargs "
                            "against the data's feature width and number of classes.") from exc
    finally:
        model.zero_grad(set_to_none=True)
        model.train()


class DataParallel(Strategy):
    """``strategy.kind: data_parallel``."""

    kind: ClassVar[str] = "data_parallel"
    resume_guarantee: ClassVar[str] = "bitwise"

    @classmethod
    def requirements(cls, cfg: JobConfig) -> dict[Capability, str]:
        name = cfg.strategy.compression.name
        if name == "auto":
            name = cfg.strategy.compression.auto_candidate
            setting = f"strategy.compression.name=auto (candidate {name})"
        else:
            setting = f"strategy.compression.name={name}"
        if name == "none":
            return {}
        if name == "fp16":
            return {Capability.FP16_COMPRESSION: setting}
        return {Capability.DDP_HOOKS: setting}

    @classmethod
    def check(cls, cfg: JobConfig) -> None:
        st = cfg.strategy
        if cfg.backend.name == "horovod" and st.comm_timing_every_steps:
            raise ConfigError("strategy.comm_timing_every_steps applies to backend.name=torch; "
                              "Horovod's wait for its allreduces is timed on every step anyway. "
                              "Set it to 0.")
        if cfg.backend.name == "horovod" and st.compression.name == "auto":
            raise ConfigError("strategy.compression.name=auto needs backend.name=torch; with "
                              "Horovod choose none or fp16.")

    @classmethod
    def run_tags(cls, cfg: JobConfig) -> dict[str, str]:
        tags = super().run_tags(cfg)
        tags["sparkml_dist.compression"] = cfg.strategy.compression.name
        if cfg.backend.name == "horovod":
            tags["horovod.compression"] = cfg.strategy.compression.name
            tags["horovod.backward_passes_per_step"] = str(cfg.strategy.backward_passes_per_step)
        return tags

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.cfg: DataParallelConfig = ctx.cfg.strategy
        self.task = ctx.cfg.data.task
        self.net = build_replica(ctx)
        self.optimizer = make_optimizer(ctx.cfg.optimizer, self.net.parameters())
        self.scheduler = make_scheduler(ctx.cfg.optimizer, self.optimizer, ctx.steps_per_epoch,
                                        ctx.total_steps)
        self.loss = loss_fn(self.task)
        self.model: nn.Module = self.net
        self.step_optimizer: Any = self.optimizer
        self.compression: str | None = None  # resolved at start (``auto``) or from a checkpoint
        self.hook_state: hooks.HookState | None = None
        self._restored_part: dict[str, Any] | None = None
        self._timed_steps = 0
        self._horovod_comm_s = 0.0

    def probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Local forward/backward on a first batch: a user error fails here, before any
        collective, and is not retried."""
        user_check(self.net, x, y, self.task)

    # -- checkpoint ------------------------------------------------------------------------

    @classmethod
    def fingerprint_of(cls, cfg: JobConfig) -> dict[str, Any]:
        return {"kind": cls.kind, "compression": cfg.strategy.compression.name}

    def state(self) -> StrategyState:
        shared = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                  "scheduler": self.scheduler.state_dict(), "compression": self.compression}
        part = self.hook_state.state_dict() if self.hook_state is not None else {}
        return StrategyState(shared=shared, per_rank=part or None)

    def load_state(self, shared: dict[str, Any], per_rank: dict[str, Any] | None) -> None:
        self.net.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        self.compression = shared.get("compression")
        self._restored_part = per_rank

    # -- wiring ----------------------------------------------------------------------------

    def start(self) -> None:
        comm = self.ctx.comm
        if self.compression is None:
            self.compression = self._resolve_compression()
        if comm.name == "horovod":
            from sparkml_dist.strategies.data_parallel.horovod_engine import wrap_horovod

            self.step_optimizer = wrap_horovod(comm.hvd, comm, self.net, self.optimizer,
                                               self.compression, self.cfg.backward_passes_per_step)
            return
        self._start_ddp()

    def _resolve_compression(self) -> str:
        name = self.cfg.compression.name
        if name != "auto":
            return name
        from sparkml_dist.strategies.data_parallel.auto import choose

        return choose(self.ctx.comm, self.net, self.cfg.compression)

    def _start_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        comm, device = self.ctx.comm, self.ctx.device
        ddp = DDP(self.net, device_ids=[device.index] if device.type == "cuda" else None,
                  process_group=comm.process_group, bucket_cap_mb=self.cfg.bucket_cap_mb)
        state, hook = self._make_hook(comm.process_group)
        if hook is not None:
            state.names = {id(p): n for n, p in self.net.named_parameters()}
            if self._restored_part:
                state.load_state_dict(self._restored_part)
            ddp.register_comm_hook(state, hook)
            self.hook_state = state
        self.model = ddp
        log.info("data_parallel: DDP with %s", f"the {self.compression} compression hook"
                 if self.compression != "none" else "torch's built-in allreduce"
                 + (" (timed hook)" if hook is not None else ""))

    def _make_hook(self, pg: Any) -> tuple[Any, Any]:
        c = self.cfg.compression
        name = self.compression
        if name == "none":
            if not self.cfg.comm_timing_every_steps:
                return None, None
            return hooks.HookState(pg), hooks.allreduce_hook
        if name == "fp16":
            return hooks.HookState(pg), hooks.fp16_hook
        if name == "bf16":
            return hooks.HookState(pg), hooks.bf16_hook
        if name == "int8":
            return hooks.HookState(pg), hooks.int8_hook
        if name == "topk":
            return hooks.TopKState(pg, c.topk_ratio, c.error_feedback), hooks.topk_hook
        if name == "powersgd":
            return hooks.PowerSGDHookState(
                pg, c.powersgd_rank, c.powersgd_warm_start, c.error_feedback,
                c.powersgd_start_step, c.powersgd_min_compression_rate,
                self.ctx.cfg.training.seed), hooks.powersgd_hook
        raise AssertionError(f"unknown compressor {name}")

    # -- the step --------------------------------------------------------------------------

    def set_step(self, step: int) -> None:
        every = self.cfg.comm_timing_every_steps
        timed = bool(every) and step % every == 0
        if self.hook_state is not None:
            self.hook_state.timed = timed
        self._timed_steps += int(timed)

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.step_optimizer.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = self.loss(out, prepare_target(y, out, self.task))
        loss.backward()
        self.step_optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def eval_module(self) -> nn.Module:
        return self.net

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def take_metrics(self, steps: int) -> dict[str, float]:
        steps = max(1, steps)
        out: dict[str, float] = {}
        if hasattr(self.step_optimizer, "take_comm_seconds"):  # Horovod: synchronize() wait
            out["time/comm_s"] = self.step_optimizer.take_comm_seconds() / steps
        if self.hook_state is not None:
            t = self.hook_state.take()
            if self.compression != "none":
                out["comm/bytes_per_step"] = t["wire_bytes"] / steps
                out["comm/dense_bytes_per_step"] = t["dense_bytes"] / steps
                out["comm/compression_ratio"] = t["dense_bytes"] / max(1.0, t["wire_bytes"])
                out["time/compress_s"] = t["compress_s"] / steps
            if self._timed_steps:
                out["time/comm_s"] = t["comm_s"] / self._timed_steps
        self._timed_steps = 0
        return out
