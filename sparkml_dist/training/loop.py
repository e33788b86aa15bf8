"""The per-rank training loop, the same for every backend.

Every rank runs the same number of equally sized steps (see :mod:`sparkml_dist.data.sharding`),
so collectives always line up. Rank 0 reports metrics and writes checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from sparkml_dist.comm.base import Communicator
from sparkml_dist.config import JobConfig
from sparkml_dist.data.sharding import batch_indices, epoch_order, steps_per_epoch
from sparkml_dist.data.shard_store import ShardStore
from sparkml_dist.errors import USER_ERROR_MARKER, UserCodeError
from sparkml_dist.models import build_model
from sparkml_dist.training.checkpoint import CheckpointStore
from sparkml_dist.training.optim import make_optimizer, make_scheduler

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    """Where rank 0's metrics go (an MLflow run in production)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step``."""

    def flush(self) -> None:
        """Wait until every recorded metric is stored."""


class NullSink:
    """Discards metrics (ranks other than 0, and pure tests)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    def flush(self) -> None:
        return None


@dataclass(frozen=True, kw_only=True)
class RankPlan:
    """What a rank needs beyond the job config; computed on the driver."""

    in_features: int
    num_outputs: int
    train_shard_sizes: tuple[int, ...]
    attempt: int = 0


@dataclass
class RankResult:
    """What a rank reports back when training ends."""

    steps_done: int
    resumed_from: int
    metrics: dict[str, float] = field(default_factory=dict)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed for the randomness inside one step (dropout...), so a resumed step replays exactly."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a step draws from (dropout...). Cheaper than ``torch.manual_seed``,
    which also queues seeding of every accelerator backend on each call."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def user_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
               task: str) -> None:
    """Run one local forward/backward before any collective; errors here are the user's.

    Runs in eval mode so batch-norm statistics are left untouched by the probe.
    """
    model.eval()
    try:
        out = model(x)
        loss = loss_fn(out, _prepare_target(y, out, task))
        loss.backward()
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise UserCodeError(f"{USER_ERROR_MARKER} the model failed on a batch of shape "
                            f"{tuple(x.shape)} (labels {tuple(y.shape)}, {y.dtype}): "
                            f"{type(exc).__name__}: {exc}. Check model.factory/model.kwargs "
                            "against the data's feature width and number of classes.") from exc
    finally:
        model.zero_grad(set_to_none=True)
        model.train()


def _loss_fn(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def _prepare_target(y: torch.Tensor, out: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return y.long()
    return y.float().reshape(out.shape)


def evaluate(model: nn.Module, data: ShardStore, comm: Communicator, task: str,
             batch_size: int, device: torch.device) -> dict[str, float]:
    """Validation metrics over the whole validation set: every rank's part, summed."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum") if task == "classification" else \
        nn.MSELoss(reduction="sum")
    sums = torch.zeros(3, dtype=torch.float64)  # loss, correct (or squared error), count
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, y in data.iter_batches(batch_size):
            x = x.to(device)
            out = model(x)
            target = _prepare_target(y.to(device), out, task)
            sums[0] += float(loss_fn(out, target))
            if task == "classification":
                sums[1] += float((out.argmax(dim=1) == target).sum())
            sums[2] += len(y)
    model.train(was_training)
    comm.all_reduce_sum(sums)
    n = max(1.0, float(sums[2]))
    if task == "classification":
        return {"val/loss": float(sums[0]) / n, "val/accuracy": float(sums[1]) / n}
    return {"val/loss": float(sums[0]) / n, "val/rmse": (float(sums[0]) / n) ** 0.5}


def _maybe_die(cfg: JobConfig, rank: int, attempt: int, step: int) -> None:
    inj = cfg.fault.inject
    if inj is not None and (inj.rank, inj.step, inj.attempt) == (rank, step, attempt):
        log.error("fault injection: rank %d exits hard at step %d on attempt %d",
                  rank, step, attempt)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(17)


def train_rank(cfg: JobConfig, plan: RankPlan, comm: Communicator, train: ShardStore,
               val: ShardStore, device: torch.device, sink: MetricSink,
               checkpoints: CheckpointStore | None) -> RankResult:
    """Train this rank's share of the job; resume from the latest checkpoint when there is one."""
    tc = cfg.training
    rank, task = comm.rank, cfg.data.task
    torch.manual_seed(tc.seed)
    try:
        net = build_model(cfg.model.factory, plan.in_features, plan.num_outputs,
                          cfg.model.kwargs).to(device)
    except Exception as exc:  # noqa: BLE001 - a factory error is the user's to fix
        raise UserCodeError(f"{USER_ERROR_MARKER} model.factory {cfg.model.factory!r} failed: "
                            f"{type(exc).__name__}: {exc}") from exc
    loss_fn = _loss_fn(task)
    probe_x, probe_y = train.gather(np.arange(min(len(train), tc.batch_size)))
    user_check(net, probe_x.to(device), probe_y.to(device), loss_fn, task)

    steps = steps_per_epoch(list(plan.train_shard_sizes), tc.batch_size)
    total = steps * tc.epochs
    optimizer = make_optimizer(cfg.optimizer, net.parameters())
    scheduler = make_scheduler(cfg.optimizer, optimizer, steps, total)
    start = 0
    restored = checkpoints.load_latest() if checkpoints is not None else None
    if restored is not None:
        state, meta = restored
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = meta.steps_done
        log.info("rank %d resumes from the checkpoint at step %d of %d", rank, start, total)
    model, optimizer = comm.wrap(net, optimizer)
    model.train()

    order: np.ndarray | None = None
    loss_sum, loss_n, window_t0 = 0.0, 0, time.perf_counter()
    comm_s = compute_s = 0.0
    metrics: dict[str, float] = {}
    for gstep in range(start, total):
        epoch, s = divmod(gstep, steps)
        if order is None or s == 0:
            order = epoch_order(len(train), tc.seed, epoch, rank, steps * tc.batch_size)
        _maybe_die(cfg, rank, plan.attempt, gstep)
        seed_step(step_seed(tc.seed, rank, gstep), device)
        x, y = train.gather(batch_indices(order, s, tc.batch_size))
        x = x.to(device, non_blocking=True)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, _prepare_target(y.to(device), out, task))
        loss.backward()
        optimizer.step()
        scheduler.step()
        step_s = time.perf_counter() - t0
        c = comm.comm_seconds()
        comm_s += c
        compute_s += max(0.0, step_s - c)
        loss_sum += float(loss.detach())
        loss_n += 1
        done = gstep + 1
        end_of_epoch = s == steps - 1
        if done % tc.log_every_steps == 0 or end_of_epoch:
            agg = comm.all_reduce_sum(torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64))
            elapsed = time.perf_counter() - window_t0
            window_t0 = time.perf_counter()  # the time spent reporting counts in the next window
            metrics = {
                "train/loss": float(agg[0] / agg[1]),
                "train/lr": float(scheduler.get_last_lr()[0]),
                "perf/samples_per_s": loss_n * tc.batch_size * comm.world_size / elapsed,
                "time/step_s": elapsed / loss_n,
                "time/comm_s": comm_s / loss_n,
                "time/compute_s": compute_s / loss_n,
                "time/comm_share": comm_s / max(1e-9, comm_s + compute_s),
                "progress/epoch": epoch + (s + 1) / steps,
                "progress/total_steps": float(total),
            }
            if rank == 0:
                sink.log_metrics(metrics, done)
            loss_sum, loss_n, comm_s, compute_s = 0.0, 0, 0.0, 0.0
        if end_of_epoch and cfg.data.val_fraction > 0:
            val_metrics = evaluate(net, val, comm, task, tc.batch_size * 4, device)
            val_metrics["epoch"] = float(epoch + 1)
            metrics.update(val_metrics)
            if rank == 0:
                sink.log_metrics(val_metrics, done)
        every = cfg.checkpoint.every_steps
        if checkpoints is not None and rank == 0 and (end_of_epoch or (every and done % every == 0)):
            t0 = time.perf_counter()
            meta = checkpoints.save(
                {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict()},
                {"steps_done": done, "epoch": epoch, "step_in_epoch": s + 1,
                 "final": done == total})
            sink.log_metrics({"checkpoint/write_s": time.perf_counter() - t0,
                              "checkpoint/size_mb": meta.size_bytes / 2**20}, done)
    sink.flush()
    if start == total and cfg.data.val_fraction > 0:  # resumed after the last step
        metrics.update(evaluate(net, val, comm, task, tc.batch_size * 4, device))
    comm.barrier()
    return RankResult(steps_done=total, resumed_from=start,
                      metrics={k: float(v) for k, v in metrics.items()})

