"""Drive the real rank loop on N local processes without Spark: a gloo group on a loopback
TCPStore, shards built from numpy arrays through the real ShardBuilder, checkpoints in a
directory store. Used by the strategy/compression tests, which need many short runs."""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sparkml_dist.config import JobConfig
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.data.shard_store import (
    FEATURES, LABEL, ROW, SHARD, SPLIT, ShardBuilder, ShardStore)
from sparkml_dist.data.sharding import batch_indices, epoch_order, steps_per_epoch
from sparkml_dist.models import build_model
from sparkml_dist.training.optim import make_optimizer, make_scheduler


@dataclass(frozen=True)
class Dataset:
    """Rows of one job: row g is validation when ``g % val_every == 0``; the i-th training row
    goes to shard ``i % world``."""

    x: np.ndarray
    y: np.ndarray
    val_every: int = 5

    def split(self, world: int) -> tuple[list[np.ndarray], np.ndarray]:
        rows = np.arange(len(self.y))
        val = rows[rows % self.val_every == 0]
        train = rows[rows % self.val_every != 0]
        return [train[r::world] for r in range(world)], val

    def shard_sizes(self, world: int) -> tuple[int, ...]:
        return tuple(len(s) for s in self.split(world)[0])


def digits(n: int | None = None) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    return Dataset(x[:n], y[:n]) if n else Dataset(x, y)


def _batch(ds: Dataset, rows: np.ndarray, shard: int, split: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(list(ds.x[rows]), type=pa.list_(pa.float32())), pa.array(ds.y[rows]),
         pa.array(rows.astype(np.int64)), pa.array(np.full(len(rows), shard, np.int32)),
         pa.array(np.full(len(rows), split, np.int8))],
        names=[FEATURES, LABEL, ROW, SHARD, SPLIT])


def rank_stores(ds: Dataset, rank: int, world: int, layout: DataLayout | None = None):
    """Rank ``rank``'s (train, validation) stores under ``layout`` (default: one shard per rank);
    empty stores for a rank that reads no shard."""
    layout = layout or DataLayout.one_per_rank(world)
    n = layout.num_shards
    shards, val = ds.split(n)
    mine = layout.shards_of_rank[rank]
    if not mine:
        return (ShardStore([], ds.x.shape[1], label_dtype=np.dtype(np.int64)),
                ShardStore([], ds.x.shape[1], label_dtype=np.dtype(np.int64)))
    b = ShardBuilder(ds.x.shape[1], 1 << 30, None, pa.int64(), expected_shards=mine)
    for shard in mine:
        b.add(_batch(ds, shards[shard], shard, 0))
        b.add(_batch(ds, val[shard::n], shard, 1))
    return b.finish()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg: JobConfig, ds: Dataset, ckpt_dir: str,
               attempt: int, out: Any) -> None:
    import datetime

    import torch.distributed as dist

    from sparkml_dist.comm.base import Endpoint
    from sparkml_dist.comm.factory import create_communicator
    from sparkml_dist.strategies import data_layout
    from sparkml_dist.training.local_store import DirectoryCheckpointStore
    from sparkml_dist.training.loop import RankPlan, train_rank

    class Sink:
        def __init__(self) -> None:
            self.rows: list[tuple[int, dict[str, float]]] = []

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.rows.append((step, dict(metrics)))

        def flush(self, timeout_s: float = 600.0) -> None:
            return None

    try:
        torch.set_num_threads(1)
        device = torch.device("cuda", 0) if cfg.backend.device == "cuda" else torch.device("cpu")
        timeout = datetime.timedelta(seconds=cfg.backend.timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout)
        ep = Endpoint(rank=rank, world_size=world, host="127.0.0.1", port=port, attempt=attempt,
                      timeout_s=cfg.backend.timeout_s)
        comm = create_communicator(cfg.backend, ep, store, device)
        layout = data_layout(cfg)
        train, val = rank_stores(ds, rank, world, layout)
        plan = RankPlan(in_features=ds.x.shape[1], num_outputs=int(ds.y.max()) + 1,
                        train_shard_sizes=ds.shard_sizes(layout.num_shards), layout=layout,
                        attempt=attempt)
        sink = Sink()
        ckpt = DirectoryCheckpointStore(ckpt_dir, cfg.checkpoint.keep_last) \
            if cfg.checkpoint.enabled else None
        try:
            result = train_rank(cfg, plan, comm, train, val, device, sink, ckpt)
        finally:
            comm.close()
        out.put((rank, "ok", {"metrics": result.metrics, "resumed_from": result.resumed_from,
                              "sink": sink.rows}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_ranks(cfg: JobConfig, ds: Dataset, ckpt_dir: str, attempt: int = 0,
              timeout_s: float = 300.0) -> dict[int, tuple[str, Any]]:
    """Run every rank of one attempt; return ``{rank: (status, payload)}`` (status ``ok``,
    ``error`` or ``died``)."""
    return spawn_ranks(_rank_main, cfg.training.num_workers, (cfg, ds, ckpt_dir, attempt),
                       timeout_s)


def spawn_ranks(target: Callable[..., None], world: int, args: tuple = (),
                timeout_s: float = 300.0, port: int | None = None
                ) -> dict[int, tuple[str, Any]]:
    """Run ``target(rank, world, port, *args, out)`` on ``world`` spawned processes (``port``
    the store's loopback port: a free one unless the caller hosts the store); each puts
    ``(rank, status, payload)`` on ``out``. Return ``{rank: (status, payload)}``; a rank that
    reported nothing within ``timeout_s`` is killed and reads ``("died", exit code)``."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port() if port is None else port
    procs = [ctx.Process(target=target, args=(r, world, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, status, payload = out.get(timeout=1.0)
            results[rank] = (status, payload)
        except queue.Empty:
            if all(not p.is_alive() for p in procs):
                break
    for r, p in enumerate(procs):
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
        if r not in results:
            results[r] = ("died", p.exitcode)
    return results


def final_model(ckpt_dir: str) -> dict[str, torch.Tensor]:
    from sparkml_dist.training.checkpoint import SHARED_PART, load_part
    from sparkml_dist.training.local_store import DirectoryCheckpointStore

    store = DirectoryCheckpointStore(ckpt_dir)
    name = store.complete_names()[0]
    return load_part(store, name, store.read_meta(name), SHARED_PART)["model"]


def reference_weights(cfg: JobConfig, ds: Dataset, readers: tuple[int, ...] | None = None
                      ) -> dict[str, torch.Tensor]:
    """One process: each step's global batch is every shard's batch concatenated, in order.
    ``readers[i]`` is the rank that reads shard ``i`` (its data order is seeded by that rank);
    default: shard ``r`` read by rank ``r``, one per rank."""
    tc = cfg.training
    readers = readers if readers is not None else tuple(range(tc.num_workers))
    shards, _ = ds.split(len(readers))
    xs = [torch.from_numpy(ds.x[s]) for s in shards]
    ys = [torch.from_numpy(ds.y[s]) for s in shards]
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model.factory, ds.x.shape[1], int(ds.y.max()) + 1, cfg.model.kwargs)
    steps = steps_per_epoch([len(s) for s in shards], tc.batch_size)
    opt = make_optimizer(cfg.optimizer, model.parameters())
    sched = make_scheduler(cfg.optimizer, opt, steps, steps * tc.epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(tc.epochs):
        orders = [epoch_order(len(s), tc.seed, epoch, readers[i], steps * tc.batch_size)
                  for i, s in enumerate(shards)]
        for s in range(steps):
            idx = [torch.as_tensor(batch_indices(o, s, tc.batch_size)) for o in orders]
            x = torch.cat([xs[r][i] for r, i in enumerate(idx)])
            y = torch.cat([ys[r][i] for r, i in enumerate(idx)])
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
    return model.state_dict()
