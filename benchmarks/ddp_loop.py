"""A plain DistributedDataParallel loop: the baseline that ``bench_training.py`` launches with
PySpark's ``TorchDistributor`` and with ``torchrun``.

It mirrors what ``sparkml_dist.fit`` runs per rank: the same MLP factory, Adam at the library's
default learning rate, cross-entropy, rows ``rank::world`` of the same data held as tensors, a
fresh permutation per epoch, per-rank batches of ``batch_size``, gloo on CPU, and the loss read
back every step. It has no metric logging, validation or checkpoints.

``extras`` adds one piece of the library's per-step work at a time, for
``bench_step_overhead.py``:
- ``seed``: ``torch.manual_seed(step_seed(...))`` before every step, as ``train_rank`` does;
- ``hook``: the library's timed allreduce comm hook (``strategy.comm_timing_every_steps``)
  instead of DDP's built-in one;
- ``shard``: batches gathered from a ``ShardStore`` of 10,000-row chunks (Spark's Arrow batch
  size) instead of indexing one tensor;
- ``mlflow``: every 10 steps a loss allreduce and, on rank 0, 9 metrics into an MLflow run
  through ``MlflowSink`` (the store at ``tracking_uri``).

``fused`` builds Adam with torch's fused kernel (``fused=True``), as ``fit`` does by default
(``optimizer.fused``); without it the loop uses torch's default Adam, as a user's loop would.

As a script (under ``torchrun``) rank 0 writes the result as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from typing import Any

EXTRAS = ("seed", "hook", "shard", "mlflow")


class _Extras:
    """The optional pieces of the library's step, switched on by name."""

    def __init__(self, names: tuple[str, ...], model, x, y, rank: int, seed: int,
                 tracking_uri: str | None) -> None:
        import numpy as np

        unknown = set(names) - set(EXTRAS)
        if unknown:
            raise ValueError(f"unknown extras {sorted(unknown)}; choose from {EXTRAS}")
        self.names, self.rank, self.seed = names, rank, seed
        self.timer = self.store = self.sink = None
        if "hook" in names:
            from sparkml_dist.strategies.data_parallel.hooks import HookState, allreduce_hook

            self.timer = HookState(None)
            self.timer.timed = True  # the hook the library registers when timing is on
            model.register_comm_hook(self.timer, allreduce_hook)
        if "shard" in names:
            from sparkml_dist.data.shard_store import ShardStore, _Chunk

            xs, ys = x.numpy(), y.numpy()
            starts = range(0, len(ys), 10_000)
            self.store = ShardStore([_Chunk(xs[i:i + 10_000], ys[i:i + 10_000],
                                            np.arange(i, min(i + 10_000, len(ys))))
                                     for i in starts], xs.shape[1])
        if "mlflow" in names and rank == 0:
            from mlflow.tracking import MlflowClient

            from sparkml_dist.tracking.mlflow_store import MlflowSink

            client = MlflowClient(tracking_uri)
            exp = client.get_experiment_by_name("ddp_loop") or client.get_experiment(
                client.create_experiment("ddp_loop"))
            self.sink = MlflowSink(tracking_uri,
                                   client.create_run(exp.experiment_id).info.run_id)

    def before_step(self, gstep: int) -> None:
        if "seed" in self.names:
            import torch

            from sparkml_dist.training.loop import step_seed

            torch.manual_seed(step_seed(self.seed, self.rank, gstep))

    def batch(self, order, s: int, batch_size: int, x, y):
        idx = order[s * batch_size:(s + 1) * batch_size]
        if self.store is not None:
            return self.store.gather(idx.numpy())
        return x[idx], y[idx]

    def after_step(self, gstep: int, loss_window: list[float]) -> None:
        if self.timer is not None:
            self.timer.take()
        if "mlflow" not in self.names:
            loss_window.clear()
        elif (gstep + 1) % 10 == 0:
            import torch
            import torch.distributed as dist

            agg = torch.tensor([sum(loss_window), float(len(loss_window))], dtype=torch.float64)
            dist.all_reduce(agg)
            loss_window.clear()
            if self.sink is not None:
                self.sink.log_metrics({f"m{i}": float(agg[0] / agg[1]) for i in range(9)},
                                      gstep + 1)


def train(data_path: str, epochs: int, batch_size: int, hidden: list[int], lr: float = 1e-3,
          seed: int = 0, extras: tuple[str, ...] = (), tracking_uri: str | None = None,
          fused: bool = False) -> dict[str, Any]:
    """Train on the ``x``/``y`` arrays of an ``.npz`` file; return rank 0's timings."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparkml_dist.models import mlp

    dist.init_process_group("gloo")  # env:// as set by torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    with np.load(data_path) as d:
        x = torch.from_numpy(np.ascontiguousarray(d["x"][rank::world]))
        y = torch.from_numpy(np.ascontiguousarray(d["y"][rank::world]))
        classes = int(d["y"].max()) + 1
    torch.manual_seed(seed)
    model = DDP(mlp(x.shape[1], classes, hidden=hidden))
    opt = torch.optim.Adam(model.parameters(), lr=lr, **({"fused": True} if fused else {}))
    loss_fn = nn.CrossEntropyLoss()
    extra = _Extras(tuple(extras), model, x, y, rank, seed, tracking_uri)
    steps = math.ceil(len(x) / batch_size)
    first_step_unix = None
    epoch_s: list[float] = []
    epoch_cpu_s: list[float] = []
    loss_sum, window = 0.0, []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + rank)
        order = torch.randperm(len(x), generator=g)
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(steps):
            if first_step_unix is None:
                first_step_unix = time.time()
            extra.before_step(epoch * steps + s)
            xb, yb = extra.batch(order, s, batch_size, x, y)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            window.append(float(loss.detach()))
            loss_sum += window[-1]
            extra.after_step(epoch * steps + s, window)
        epoch_s.append(time.perf_counter() - t0)
        epoch_cpu_s.append(time.process_time() - c0)  # all threads of this rank's process
    result = [{"first_step_unix": first_step_unix, "epoch_s": epoch_s, "epoch_cpu_s": epoch_cpu_s,
               "samples_per_epoch": steps * batch_size * world, "steps_per_epoch": steps,
               "final_loss_mean": loss_sum / (steps * epochs),
               "torch_threads": torch.get_num_threads()}]
    # Every rank returns rank 0's figures: in local mode TorchDistributor keeps the return value
    # of whichever rank writes its output file last, not necessarily rank 0's.
    dist.broadcast_object_list(result, src=0)
    # DDP's reducer holds the process group: drop it first, or the group outlives
    # destroy_process_group and its gloo threads are torn down at interpreter exit, which aborts
    # the process ("terminate called without an active exception").
    del model, opt, extra
    gc.collect()
    dist.destroy_process_group()
    return result[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--hidden", type=int, nargs="+", required=True)
    p.add_argument("--extras", nargs="*", default=[], choices=EXTRAS)
    p.add_argument("--tracking-uri")
    p.add_argument("--fused", action="store_true", help="Adam with torch's fused kernel")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    result = train(a.data, a.epochs, a.batch_size, a.hidden, extras=tuple(a.extras),
                   tracking_uri=a.tracking_uri, fused=a.fused)
    if int(os.environ["RANK"]) == 0:
        with open(a.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
