"""A worker: for each step from where the servers say it is, pull the parameters, compute the
gradient of the mean loss on its batch, push it (a push also brings back the next step's
parameters: one round trip per step and shard). The data position lives on the servers (the
worker's clock), so a retried Spark task resumes at the step its predecessor had reached.

:func:`train_worker` is the loop (no Spark); :func:`run_worker_task` is the ``mapInArrow`` body
of the ordinary (non-barrier) stage that runs one worker per partition of the prepared frame.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sparkml_dist.data.sharding import batch_indices, epoch_order
from sparkml_dist.strategies.parameter_server.client import Endpoint, Servers

log = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([("worker", pa.int32()), ("attempt", pa.int32()),
                           ("report", pa.string())])
RESULT_DDL = "worker int, attempt int, report string"


@dataclass(frozen=True)
class WorkerTask:
    """Everything a worker receives from the driver (picklable; the secret is not printed)."""

    factory: str
    model_kwargs: dict[str, Any]
    in_features: int
    num_outputs: int
    task: str
    batch_size: int
    seed: int
    steps_per_epoch: int
    total_steps: int
    shard_names: tuple[tuple[str, ...], ...]
    """Parameter names held by each server shard."""
    endpoints: tuple[tuple[Endpoint, ...], ...]
    secret: bytes = field(repr=False)
    timeout_s: float = 300.0
    straggler_sleep_s: dict[int, float] = field(default_factory=dict)
    layout_shards: tuple[tuple[int, ...], ...] = ()
    """The data layout's shards of each worker."""
    shard_memory_mb: float = 512.0
    spill_dir: str | None = None
    crash: tuple[int, int, int] | None = None
    """TEST-ONLY (``fault.inject``): (worker, step, task attempt) at which that worker's
    process exits hard."""


def _loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from sparkml_dist.training.objective import loss_fn, prepare_target

    return loss_fn(task)(out, prepare_target(y, out, task))


def train_worker(task: WorkerTask, worker: int, train: Any, attempt: int = 0) -> dict[str, Any]:
    """Run ``worker``'s steps against the servers; ``train`` is its
    :class:`~sparkml_dist.data.shard_store.ShardStore`. Returns what it measured."""
    from sparkml_dist.models import build_model

    model = build_model(task.factory, task.in_features, task.num_outputs, task.model_kwargs)
    named = dict(model.named_parameters())
    groups = [[named[n] for n in names] for names in task.shard_names]
    sizes = [sum(p.numel() for p in g) for g in groups]
    servers = Servers([list(e) for e in task.endpoints], task.secret, task.timeout_s, sizes)
    sleep = float(task.straggler_sleep_s.get(worker, 0.0))
    rep: dict[str, Any] = {"worker": worker, "stamps": [], "losses": [], "pull_s": 0.0,
                           "push_s": 0.0, "compute_s": 0.0}
    try:
        start = servers.hello(worker)
        rep["start_step"] = start
        epoch, order = -1, np.empty(0, np.int64)
        t_begin = time.monotonic()
        pulled: tuple[list[np.ndarray], list[int]] | None = None
        t1 = 0.0
        for step in range(start, task.total_steps):
            if task.crash is not None and task.crash == (worker, step, attempt):
                log.error("TEST fault injection: worker %d exits at step %d", worker, step)
                os._exit(17)
            t0 = time.time()
            e, s = divmod(step, task.steps_per_epoch)
            if e != epoch:
                epoch = e
                order = epoch_order(len(train), task.seed, e, worker,
                                    task.steps_per_epoch * task.batch_size)
            if pulled is None:  # the first step; later ones arrive with the previous push
                pulled = servers.pull(worker, step)
                t1 = time.time()
            values, versions = pulled
            with torch.no_grad():
                for g, vec in zip(groups, values):
                    offset = 0
                    for p in g:
                        n = p.numel()
                        p.copy_(torch.from_numpy(vec[offset:offset + n]).reshape(p.shape))
                        offset += n
            x, y = train.gather(batch_indices(order, s, task.batch_size))
            model.zero_grad(set_to_none=True)
            loss = _loss(task.task, model(x), y)
            loss.backward()
            grads = [torch.cat([p.grad.reshape(-1) for p in g]).numpy() for g in groups]
            t2 = time.time()
            pulled = servers.push(worker, step, versions, grads,
                                  pull_next=step + 1 < task.total_steps)
            t3 = time.time()
            rep["pull_s"] += max(0.0, t1 - t0)
            rep["compute_s"] += t2 - max(t0, t1)
            rep["push_s"] += t3 - t2  # with the next step's pull
            # wall clock: step start, its values in hand, its push acknowledged
            rep["stamps"].append([step, t0, t1, t3])
            t1 = t3
            rep["losses"].append(float(loss.detach()))
            if sleep:
                time.sleep(sleep)
        rep["steps"] = task.total_steps - start
        rep["seconds"] = time.monotonic() - t_begin
        rep["bytes_out"], rep["bytes_in"] = servers.bytes
        rep["failovers"] = servers.failovers
    finally:
        servers.close()
    return rep


def run_worker_task(task: WorkerTask, batches: Iterator[pa.RecordBatch]
                    ) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: partition ``r`` of the prepared frame is worker ``r``."""
    from pyspark import TaskContext

    from sparkml_dist.data.shard_store import ShardBuilder

    torch.set_num_threads(1)
    ctx = TaskContext.get()
    worker, attempt = ctx.partitionId(), ctx.attemptNumber()
    builder = ShardBuilder(task.in_features, int(task.shard_memory_mb * 2**20), task.spill_dir,
                           pa.int64() if task.task == "classification" else pa.float32())
    builder.expected_shards = task.layout_shards[worker]
    shards = builder.extend(batches).finish_shards()
    if len(shards) != 1:
        raise RuntimeError(f"parameter-server worker {worker} got data shards {sorted(shards)}; "
                           "each worker reads exactly one")
    train, _ = next(iter(shards.values()))
    log.info("parameter-server worker %d (attempt %d) holds %d training rows", worker, attempt,
             len(train))
    rep = train_worker(task, worker, train, attempt)
    rep["attempt"] = attempt
    yield pa.RecordBatch.from_pylist([{"worker": worker, "attempt": attempt,
                                       "report": json.dumps(rep)}], schema=RESULT_SCHEMA)
