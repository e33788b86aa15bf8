"""The per-rank loop of asynchronous push-sum: each rank steps at its own pace until the job's
shared sample count reaches the epoch's budget, then all ranks meet at a consistent cut for
metrics, validation and the checkpoint. Run by :func:`sparkml_dist.training.loop.train_rank` in
place of the shared barrier loop (``own_loop``); the design is in the package docstring."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from sparkml_dist.algo.gossip import consensus_distance

if TYPE_CHECKING:
    from sparkml_dist.comm.base import Communicator
    from sparkml_dist.config import JobConfig
    from sparkml_dist.data.shard_store import ShardStore
    from sparkml_dist.strategies.gossip_async.strategy import AsyncPushSum
    from sparkml_dist.training.checkpoint import CheckpointStore
    from sparkml_dist.training.early_stopping import EarlyStopping
    from sparkml_dist.training.loop import MetricSink, RankPlan
    from sparkml_dist.training.uploads import BackgroundUploads

log = logging.getLogger(__name__)


def counter_key(epoch: int) -> str:
    """The rendezvous-store counter of the training samples the job took in ``epoch``."""
    return f"gossip_async/samples/{epoch}"


def run_async(cfg: JobConfig, plan: RankPlan, comm: Communicator, strategy: AsyncPushSum,
              train: ShardStore, val: ShardStore, device: torch.device, sink: MetricSink,
              checkpoints: CheckpointStore | None, fingerprint: dict[str, Any], start: int,
              steps: int, bounds: tuple[int, int], stopper: EarlyStopping | None,
              uploads: BackgroundUploads | None = None) -> tuple[dict[str, float], int]:
    """Epochs ``start // steps`` to ``bounds[0] // steps``; ``steps`` (the barrier loop's steps
    per epoch) fixes the epoch's budget: ``steps * batch_size * world_size`` samples counted
    across the job. Returns the last metrics and the nominal steps done."""
    assert stopper is None, "the driver refuses early stopping with async_push_sum"
    end, _ = bounds
    metrics: dict[str, float] = {}
    for epoch in range(start // steps, end // steps):
        metrics = _epoch(cfg, plan, comm, strategy, train, val, device, sink, checkpoints,
                         fingerprint, epoch, steps, uploads)
    return metrics, end


def _epoch(cfg: JobConfig, plan: RankPlan, comm: Communicator, strategy: AsyncPushSum,
           train: ShardStore, val: ShardStore, device: torch.device, sink: MetricSink,
           checkpoints: CheckpointStore | None, fingerprint: dict[str, Any], epoch: int,
           steps: int, uploads: BackgroundUploads | None) -> dict[str, float]:
    from sparkml_dist.training.loop import check_finite_loss, save_with_metrics, validate

    tc = cfg.training
    rank = comm.rank
    before = strategy.counters()
    t0 = time.perf_counter()
    loss_sum, n_steps = _train(cfg, plan, comm, strategy, train, device, epoch, steps, uploads)
    train_s = time.perf_counter() - t0
    sums = _cut(comm, strategy, epoch, loss_sum, n_steps)
    wall_s = time.perf_counter() - t0  # the job's training time of this epoch ends at the cut
    samples = int(comm.store.add(counter_key(epoch), 0))
    done = (epoch + 1) * steps
    check_finite_loss(sums[-2], done)
    counts = [n_steps, train_s, *(a - b for a, b in zip(strategy.counters(), before))]
    metrics = _metrics(sums, comm.all_gather_object(counts), samples, wall_s, strategy.lr,
                       comm.world_size)
    metrics["progress/epoch"] = float(epoch + 1)
    if rank == 0:
        sink.log_metrics(metrics, done)
    strategy.end_epoch(epoch + 1)
    if cfg.data.val_fraction > 0:
        metrics.update(validate(strategy.eval_module(), val, comm, cfg, device, sink, epoch, done))
    if checkpoints is not None:
        save_with_metrics(checkpoints, comm, strategy,
                          {"steps_done": done, "epoch": epoch, "step_in_epoch": steps,
                           "final": done == steps * tc.epochs, "early_stopping": {}},
                          fingerprint, uploads, sink)
    log.info("rank %d: epoch %d done after %d local steps (%.1f steps/s), job %d samples",
             rank, epoch + 1, n_steps, n_steps / max(train_s, 1e-9), samples)
    return metrics


def _train(cfg: JobConfig, plan: RankPlan, comm: Communicator, strategy: AsyncPushSum,
           train: ShardStore, device: torch.device, epoch: int, steps: int,
           uploads: BackgroundUploads | None) -> tuple[torch.Tensor, int]:
    """This rank's steps until the job's count reaches the epoch's budget; returns the sum of
    its losses and its step count."""
    from sparkml_dist.training.loop import _maybe_die, seed_step, step_seed

    tc = cfg.training
    global_batch = tc.batch_size * comm.world_size
    budget, key = steps * global_batch, counter_key(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_steps = count = 0
    job_step = epoch * steps  # the job's step as this rank last saw the shared count
    while count < budget:
        # fault.inject keys on the job's step, not this rank's own count: how the ranks' paces
        # split an epoch's budget varies from run to run, the epoch a job's step falls in not.
        _maybe_die(cfg, comm.rank, plan.attempt, job_step, uploads, reached=True)
        x, y = train.gather(strategy.next_rows(len(train), tc.batch_size))
        seed_step(step_seed(tc.seed, comm.rank, strategy.local_steps), device)
        loss_sum += strategy.train_step(strategy.local_steps, x.to(device), y.to(device))
        n_steps += 1
        count = int(comm.store.add(key, tc.batch_size))
        job_step = epoch * steps + min(steps, count // global_batch)
        strategy.advance_schedule(job_step)
    # The injected step fell in this epoch but the others' steps took the job past it between
    # two of this rank's: the rank still dies in that epoch, before its cut.
    _maybe_die(cfg, comm.rank, plan.attempt, job_step - 1, uploads, reached=True)
    return loss_sum, n_steps


def _cut(comm: Communicator, strategy: AsyncPushSum, epoch: int, loss_sum: torch.Tensor,
         n_steps: int) -> torch.Tensor:
    """The epoch's consistent cut, then one all_reduce of the ranks' flat models, their squared
    norms, weights, loss sums and step counts (in that order). That all_reduce is the first
    collective after the cut's absorb: no rank sends again before every rank has absorbed."""
    try:
        strategy.cut()
        flat = strategy._flat().double().cpu()  # every piece on the host (one concat)
        return comm.all_reduce(torch.cat([
            flat, flat.pow(2).sum().reshape(1), strategy.weight.double().cpu().reshape(1),
            loss_sum.cpu().reshape(1), torch.tensor([float(n_steps)], dtype=torch.float64)]),
            "sum")
    except (RuntimeError, ConnectionError, TimeoutError) as exc:
        lost = strategy.inbox.lost_peers()
        if not lost:
            raise
        raise ConnectionError(f"rank {comm.rank}: the cut at the end of epoch {epoch + 1} "
                              f"failed; rank(s) {lost} closed their connections and are lost "
                              f"({type(exc).__name__}: {exc})") from exc


def _metrics(sums: torch.Tensor, per_rank: list[list[float]], samples: int, wall_s: float,
             lr: float, world: int) -> dict[str, float]:
    """The epoch's metrics from the cut's sums (:func:`_cut`) and every rank's counts: steps,
    training seconds, then the differences of :meth:`AsyncPushSum.counters`."""
    dist, rel = consensus_distance(sums[:-4], float(sums[-4]), world)
    total = [float(sum(r[i] for r in per_rank)) for i in range(2, 8)]
    out: dict[str, float] = {
        "train/loss": float(sums[-2] / sums[-1]), "train/lr": lr,
        "perf/samples_per_s": samples / wall_s, "perf/epoch_train_s": wall_s,
        "perf/epoch_samples": float(samples),
        "gossip/consensus_distance": dist, "gossip/consensus_relative": rel,
        "gossip/push_sum_weight_total": float(sums[-3]), "comm/bytes_sent": total[0],
        "gossip/messages_sent": total[1], "gossip/pushes_skipped": total[2],
        "gossip/pushes_held": total[3], "gossip/message_age_s": total[5] / max(total[4], 1.0)}
    for r, (n, secs, *_, absorbed, _) in enumerate(per_rank):
        out[f"gossip/rank_{r}/steps"] = float(n)
        out[f"gossip/rank_{r}/steps_per_s"] = n / max(secs, 1e-9)
        out[f"gossip/rank_{r}/absorbed_per_step"] = absorbed / max(n, 1)
    return out
