"""The per-rank training loop every barrier strategy shares.

It owns the data order, the windows of metrics, the checkpoint cadence (with resume agreement)
and the fault hooks; the strategy (:mod:`sparkml_dist.strategies`) owns the model, the step and
what a checkpoint holds. Every rank runs the same number of equally sized steps (see
:mod:`sparkml_dist.data.sharding`), so collectives always line up. Rank 0 reports metrics and
commits checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from sparkml_dist.comm.base import Communicator
from sparkml_dist.config import JobConfig
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.data.sharding import batch_indices, epoch_order, steps_per_epoch
from sparkml_dist.data.shard_store import ShardStore
from sparkml_dist.errors import USER_ERROR_MARKER, CheckpointError, UserCodeError
from sparkml_dist.strategies.base import RankContext, Strategy
from sparkml_dist.training.early_stopping import EarlyStopping, EarlyStoppingState
from sparkml_dist.training.feed import make_feed
from sparkml_dist.training.checkpoint import (
    BEST_NAME, DEFAULT_UPLOAD_TIMEOUT_S, META_FILE, SHARED_PART, CheckpointMeta, CheckpointStore,
    check_fingerprint, dir_name, encode_part, latest_loadable, load_part, part_file,
    wait_for_parts)
from sparkml_dist.training.uploads import BackgroundUploads
from sparkml_dist.training.objective import loss_fn, prepare_target

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    """Where rank 0's metrics go (an MLflow run in production)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step``."""

    def flush(self, timeout_s: float = 600.0) -> None:
        """Wait (at most ``timeout_s``) until every recorded metric is stored."""


class NullSink:
    """Discards metrics (ranks other than 0, and pure tests)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    def flush(self, timeout_s: float = 600.0) -> None:
        return None


@dataclass(frozen=True, kw_only=True)
class RankPlan:
    """What a rank needs beyond the job config; computed on the driver."""

    in_features: int
    num_outputs: int
    train_shard_sizes: tuple[int, ...]
    """Training rows per shard (every shard, not only this rank's)."""
    layout: DataLayout | None = None
    """Which shards each rank reads (None: one per rank)."""
    attempt: int = 0
    val_shard_sizes: tuple[int, ...] | None = None
    """Validation rows per shard, where the driver dealt them (None: not checked)."""

    def data_layout(self) -> DataLayout:
        return self.layout or DataLayout.one_per_rank(len(self.train_shard_sizes))


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


def evaluate(model: nn.Module, data: ShardStore, comm: Communicator, task: str,
             batch_size: int, device: torch.device) -> dict[str, float]:
    """Validation metrics over the whole validation set: every rank's part, summed."""
    criterion = loss_fn(task, reduction="sum")
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct or sq. error, count
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, y in data.iter_batches(batch_size):
            x = x.to(device)
            out = model(x)
            target = prepare_target(y.to(device), out, task)
            sums[0] += criterion(out, target).double()
            if task == "classification":
                sums[1] += (out.argmax(dim=1) == target).sum()
            sums[2] += len(y)
    model.train(was_training)
    sums = comm.all_reduce(sums.cpu(), "sum")
    n = max(1.0, float(sums[2]))
    if task == "classification":
        return {"val/loss": float(sums[0]) / n, "val/accuracy": float(sums[1]) / n}
    return {"val/loss": float(sums[0]) / n, "val/rmse": (float(sums[0]) / n) ** 0.5}


def validate(module: nn.Module, val: ShardStore, comm: Communicator, cfg: JobConfig,
             device: torch.device, sink: MetricSink, epoch: int, done: int) -> dict[str, float]:
    """The end of epoch ``epoch``'s validation metrics (:func:`evaluate`, tagged with the
    1-based epoch); rank 0 logs them at step ``done``."""
    t0 = time.perf_counter()
    metrics = evaluate(module, val, comm, cfg.data.task, cfg.training.batch_size * 4, device)
    metrics["epoch"] = float(epoch + 1)
    if comm.rank == 0:
        # The pass's seconds go to the run only, not into the returned metrics (which resumed
        # and reference runs compare).
        sink.log_metrics({**metrics, "time/validate_s": time.perf_counter() - t0}, done)
    return metrics


def save_with_metrics(store: CheckpointStore, comm: Communicator, strategy: Strategy,
                      fields: dict[str, Any], fingerprint: dict[str, Any],
                      uploads: BackgroundUploads | None, sink: MetricSink) -> None:
    """:func:`save`, then (rank 0) ``checkpoint/write_s`` and ``checkpoint/size_mb`` logged at
    the checkpoint's step."""
    t0 = time.perf_counter()
    meta = save(store, comm, strategy, fields, fingerprint, uploads)
    if meta is not None:
        size = sum(p["size_bytes"] for p in meta.parts.values())
        sink.log_metrics({"checkpoint/write_s": time.perf_counter() - t0,
                          "checkpoint/size_mb": size / 2**20}, fields["steps_done"])


class _DataOrder:
    """Rows of each global step's batch: the epoch's permutation (computed once per epoch).
    A rank that reads no shard (its strategy feeds it from its peers) gets empty batches."""

    def __init__(self, rows: int, seed: int, rank: int, steps: int, batch_size: int) -> None:
        self.rows, self.seed, self.rank = rows, seed, rank
        self.steps, self.batch_size = steps, batch_size
        self._epoch = -1
        self._order: np.ndarray | None = None

    def __call__(self, step: int) -> np.ndarray:
        if self.rows == 0:
            return np.zeros(0, dtype=np.int64)
        epoch, s = divmod(step, self.steps)
        if epoch != self._epoch:
            self._order = epoch_order(self.rows, self.seed, epoch, self.rank,
                                      self.steps * self.batch_size)
            self._epoch = epoch
        return batch_indices(self._order, s, self.batch_size)


def _maybe_die(cfg: JobConfig, rank: int, attempt: int, step: int,
               uploads: BackgroundUploads | None = None, *, reached: bool = False) -> None:
    """Test-only ``fault.inject``: exit hard at the injected step. ``reached``: the caller's
    step can jump past the injected one (the job's step seen by a rank of an asynchronous loop),
    so the rank dies at the first step at or after it."""
    inj = cfg.fault.inject
    if inj is None or (inj.rank, inj.attempt) != (rank, attempt):
        return
    if step == inj.step or (reached and step > inj.step):
        if uploads is not None:  # the fault strikes at the step, after the checkpoints before it
            uploads.wait_alone(cfg.backend.timeout_s)
        log.error("fault injection: rank %d exits hard at step %d on attempt %d",
                  rank, step, attempt)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(17)


def restore(store: CheckpointStore, comm: Communicator, fingerprint: dict[str, Any]
            ) -> tuple[dict[str, Any], dict[str, Any] | None, CheckpointMeta] | None:
    """Resume agreement: rank 0 picks the checkpoint, every rank loads exactly that one.

    Returns (shared state, this rank's part, metadata), or None for a fresh start. A rank that
    cannot load the chosen checkpoint makes every rank fail with its reason.
    """
    choice: Any = None
    if comm.rank == 0:
        try:
            found = latest_loadable(store)
            choice = (found[0], None) if found else (None, None)
        except CheckpointError as exc:
            choice, found = (None, str(exc)), None
    name, error = comm.broadcast_object(choice, 0)
    if error:
        raise CheckpointError(error)
    if name is None:
        return None
    loaded: Any = None
    problem = None
    try:
        meta = found[1] if comm.rank == 0 else store.read_meta(name)
        check_fingerprint(name, meta.fingerprint, fingerprint)
        shared = found[2] if comm.rank == 0 else load_part(store, name, meta, SHARED_PART)
        mine = part_file(comm.rank)
        part = load_part(store, name, meta, mine) if mine in meta.parts else None
        loaded = (shared, part, meta)
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks below
        problem = f"rank {comm.rank} could not load checkpoint {name}: {type(exc).__name__}: {exc}"
    problems = [p for p in comm.all_gather_object(problem) if p]
    if problems:
        raise CheckpointError("; ".join(problems))
    return loaded


def save(store: CheckpointStore, comm: Communicator, strategy: Strategy,
         fields: dict[str, Any], fingerprint: dict[str, Any],
         uploads: BackgroundUploads | None = None) -> CheckpointMeta | None:
    """Every rank stores its own part; rank 0 stores the shared part and, once every part is
    stored, commits. With ``uploads`` the parts are serialized here and stored in the background
    (the previous checkpoint's upload is waited for first, on every rank together)."""
    if uploads is not None:
        uploads.drain_together(comm)
    st = strategy.state()
    name = dir_name(fields["steps_done"])
    mine = encode_part(st.per_rank) if st.per_rank else None
    own = part_file(comm.rank)
    if mine is not None and uploads is None:
        store.write_part(name, own, mine[0])
    infos = comm.all_gather_object(mine[1] if mine else None)
    if comm.rank != 0:
        if mine is not None and uploads is not None:
            uploads.submit(name, lambda: store.write_part(name, own, mine[0]))
        return None
    parts = {part_file(r): info for r, info in enumerate(infos) if info}
    shared, parts[SHARED_PART] = encode_part(st.shared or {})
    meta = CheckpointMeta(parts=parts, fingerprint=fingerprint, **fields)
    others = {f: p["size_bytes"] for f, p in parts.items() if f not in (own, SHARED_PART)}
    timeout_s = uploads.timeout_s if uploads is not None else 0.0

    def store_and_commit() -> None:
        if mine is not None and uploads is not None:
            store.write_part(name, own, mine[0])
        store.write_part(name, SHARED_PART, shared)
        wait_for_parts(store, name, others if uploads is not None else {}, timeout_s)
        store.commit(name, meta)  # the commit marker, last

    if uploads is None:
        store_and_commit()
    else:
        uploads.submit(name, store_and_commit)
    return meta


def train_rank(cfg: JobConfig, plan: RankPlan, comm: Communicator, train: ShardStore,
               val: ShardStore, device: torch.device, sink: MetricSink,
               checkpoints: CheckpointStore | None) -> RankResult:
    """Train this rank's share of the job; resume from the agreed checkpoint when there is one."""
    from sparkml_dist.strategies.registry import job_fingerprint, strategy_class

    tc = cfg.training
    rank = comm.rank
    steps = steps_per_epoch(list(plan.train_shard_sizes), tc.batch_size)
    total = steps * tc.epochs
    ctx = RankContext(cfg=cfg, comm=comm, device=device, in_features=plan.in_features,
                      num_outputs=plan.num_outputs, steps_per_epoch=steps, total_steps=total)
    try:  # building the model and the strategy, and a local probe step: the user's settings
        strategy = strategy_class(cfg.strategy.kind)(ctx)
        probe_x, probe_y = train.gather(np.arange(min(len(train), tc.batch_size)))
        strategy.probe(probe_x.to(device), probe_y.to(device))
    except Exception as exc:  # noqa: BLE001 - classified: a relaunch cannot fix a setup error
        user = setup_error(exc, rank)
        if user is exc:
            raise
        raise user from exc
    fingerprint = job_fingerprint(cfg, plan.data_layout())
    start, end = 0, total
    restored = restore(checkpoints, comm, fingerprint) if checkpoints is not None else None
    stopper = make_stopper(cfg, restored[2] if restored is not None else None)
    if restored is not None:
        shared, part, meta = restored
        strategy.load_state(shared, part)
        start = meta.steps_done
        if meta.final and meta.early_stopping.get("stopped"):
            end = start  # stopped early: a relaunch trains nothing more
        log.info("rank %d resumes from the checkpoint at step %d of %d", rank, start, total)
    uploads = None if checkpoints is None else BackgroundUploads(
        getattr(checkpoints, "upload_timeout_s", DEFAULT_UPLOAD_TIMEOUT_S))
    strategy.start()
    try:
        run = strategy.own_loop or _run_steps
        metrics, end = run(cfg, plan, comm, strategy, train, val, device, sink,
                           checkpoints, fingerprint, start, steps, (end, total), stopper,
                           uploads)
        if uploads is not None:  # training ends once the last checkpoint is stored
            uploads.drain_together(comm)
    except BaseException:
        if uploads is not None:  # a checkpoint whose parts are all stored still commits
            uploads.wait_alone(cfg.backend.timeout_s)
        try:  # the metrics up to the failure are what a user diagnoses it with
            sink.flush(min(30.0, cfg.backend.timeout_s))
        except Exception as exc:  # noqa: BLE001 - never hide the failure itself
            log.warning("rank %d could not store its last metrics: %s", rank, exc)
        raise
    finally:
        strategy.close()
    sink.flush()
    if start == end and cfg.data.val_fraction > 0:  # resumed after the last step
        metrics.update(evaluate(strategy.eval_module(), val, comm, cfg.data.task,
                                tc.batch_size * 4, device))
    comm.barrier()
    return RankResult(steps_done=end, resumed_from=start,
                      metrics={k: float(v) for k, v in metrics.items()})


def make_stopper(cfg: JobConfig, meta: CheckpointMeta | None) -> EarlyStopping | None:
    """The early-stopping rule of ``training.early_stopping`` (None when unset), continuing
    from the state a resumed checkpoint recorded."""
    es = cfg.training.early_stopping
    if es is None:
        return None
    state = EarlyStoppingState.from_dict(meta.early_stopping) if meta is not None else None
    return EarlyStopping(es.resolved_mode(), es.patience, es.min_delta, state)


def _early_stop(cfg: JobConfig, stopper: EarlyStopping, comm: Communicator,
                checkpoints: CheckpointStore | None, module: nn.Module,
                val_metrics: dict[str, float], epoch: int, done: int,
                fingerprint: dict[str, Any], uploads: BackgroundUploads | None = None) -> bool:
    """Feed the epoch's validation metric to the rule; rank 0 decides and broadcasts, so every
    rank stops after the same epoch. With ``keep_best``, rank 0 stores an improving epoch's
    model under :data:`BEST_NAME`, in the background like checkpoints (``uploads``), so a slow
    store never holds up the collectives. Returns whether training stops now."""
    es = cfg.training.early_stopping
    assert es is not None
    decision: Any = None
    if comm.rank == 0:
        improved = stopper.update(val_metrics[es.metric], epoch + 1)
        decision = (improved, stopper.state.to_dict())
    improved, state = comm.broadcast_object(decision, 0)
    stopper.state = EarlyStoppingState.from_dict(state)
    if improved and es.keep_best and checkpoints is not None:
        if uploads is not None:
            uploads.drain_together(comm)  # every rank: the previous upload is done
        if comm.rank == 0:
            store = checkpoints
            data, info = encode_part({"model": module.state_dict()})  # a snapshot, now
            meta = CheckpointMeta(steps_done=done, epoch=epoch, step_in_epoch=-1,
                                  parts={SHARED_PART: info}, fingerprint=fingerprint,
                                  early_stopping=stopper.state.to_dict())

            def store_best() -> None:
                store.write_part(BEST_NAME, SHARED_PART, data)
                store.write_part(BEST_NAME, META_FILE, meta.to_json().encode())  # written last

            if uploads is None:
                store_best()
            else:
                uploads.submit(BEST_NAME, store_best)
    if stopper.state.stopped:
        log.info("early stopping after epoch %d: %s has not improved for %d epoch(s); best %.6g "
                 "at epoch %d", epoch + 1, es.metric, stopper.state.bad_epochs,
                 stopper.state.best, stopper.state.best_epoch)
    return stopper.state.stopped


def _run_steps(cfg: JobConfig, plan: RankPlan, comm: Communicator, strategy: Strategy,
               train: ShardStore, val: ShardStore, device: torch.device, sink: MetricSink,
               checkpoints: CheckpointStore | None, fingerprint: dict[str, Any], start: int,
               steps: int, bounds: tuple[int, int], stopper: EarlyStopping | None,
               uploads: BackgroundUploads | None = None) -> tuple[dict[str, float], int]:
    """Steps ``start`` to ``bounds[0]`` of ``bounds[1]``; returns the last metrics and the steps
    done (fewer when early stopping fires)."""
    end, total = bounds
    tc = cfg.training
    rank = comm.rank
    feed = make_feed(train, device, _DataOrder(len(train), tc.seed, rank, steps, tc.batch_size),
                     cfg.data.device_cache_share, cfg.data.prefetch)
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)  # no host sync per step
    loss_n, window_t0 = 0, time.perf_counter()
    metrics: dict[str, float] = {}
    batches = feed.batches(start, end)
    for gstep, (x, y) in zip(range(start, end), batches):
        epoch, s = divmod(gstep, steps)
        _maybe_die(cfg, rank, plan.attempt, gstep, uploads)
        seed_step(step_seed(tc.seed, rank, gstep), device)
        strategy.set_step(gstep)
        loss = strategy.train_step(gstep, x, y)
        loss_acc += loss
        loss_n += 1
        done = gstep + 1
        end_of_epoch = s == steps - 1
        if done % tc.log_every_steps == 0 or end_of_epoch:
            agg = comm.all_reduce(torch.stack([loss_acc.cpu(), torch.tensor(
                float(loss_n), dtype=torch.float64)]), "sum")
            check_finite_loss(agg[0], done)  # the same sum on every rank: all stop together
            elapsed = time.perf_counter() - window_t0
            window_t0 = time.perf_counter()  # the time spent reporting counts in the next window
            metrics = window_metrics(agg, elapsed, loss_n,
                                     strategy.rows_per_step(tc.batch_size, comm.world_size),
                                     strategy, epoch + (s + 1) / steps, total)
            if rank == 0:
                sink.log_metrics(metrics, done)
            loss_acc.zero_()
            loss_n = 0
        stop = False
        if end_of_epoch and cfg.data.val_fraction > 0:
            module = strategy.eval_module()
            val_metrics = validate(module, val, comm, cfg, device, sink, epoch, done)
            metrics.update(val_metrics)
            if stopper is not None:
                stop = _early_stop(cfg, stopper, comm, checkpoints, module, val_metrics, epoch,
                                   done, fingerprint, uploads)
        every = cfg.checkpoint.every_steps
        if checkpoints is not None and (end_of_epoch or (every and done % every == 0)):
            if loss_n:  # steps since the last window: never checkpoint a non-finite model
                check_finite_loss(comm.all_reduce(torch.stack([loss_acc.cpu()]), "sum")[0], done)
            save_with_metrics(checkpoints, comm, strategy,
                              {"steps_done": done, "epoch": epoch, "step_in_epoch": s + 1,
                               "final": done == total or stop,
                               "early_stopping": stopper.state.to_dict() if stopper else {}},
                              fingerprint, uploads, sink)
        if stop:
            if rank == 0:
                sink.log_metrics({"early_stopping/stopped_epoch": float(epoch + 1)}, done)
            batches.close()
            return metrics, done
    return metrics, end


def setup_error(exc: Exception, rank: int) -> Exception:
    """An error raised while a rank sets up, marked as the user's (not relaunched) unless it
    comes from the transport (a lost or slow peer during DDP's first broadcast)."""
    text = str(exc)
    transport = isinstance(exc, (torch.distributed.DistError, TimeoutError, ConnectionError)) \
        or any(w in text for w in ("gloo", "NCCL", "Connection reset", "Connection closed"))
    if transport or USER_ERROR_MARKER in text:
        return exc
    return UserCodeError(f"{USER_ERROR_MARKER} rank {rank} could not set up training "
                         f"({type(exc).__name__}: {exc}). Check model.factory, model.kwargs and "
                         "the strategy settings; a relaunch would fail the same way.")


def check_finite_loss(loss_sum: torch.Tensor, step: int) -> None:
    """Stop training if the ranks' summed loss is NaN or infinite (the checkpoint before it is
    kept: this runs before any checkpoint of ``step``)."""
    if not torch.isfinite(loss_sum):
        raise UserCodeError(
            f"{USER_ERROR_MARKER} the training loss became {float(loss_sum)} by step {step}; "
            "training stopped on every rank and the last checkpoint before it is kept. Lower "
            "optimizer.lr (or add warm-up), check the features for extreme or non-finite "
            "values, or scale them.")


def window_metrics(agg: torch.Tensor, elapsed: float, steps: int, global_batch: int,
                   strategy: Strategy, epoch: float, total: int) -> dict[str, float]:
    """Train metrics of one reporting window: loss, rate, step time and the strategy's own."""
    step_s = elapsed / steps
    out = {"train/loss": float(agg[0] / agg[1]), "train/lr": strategy.lr,
           "perf/samples_per_s": steps * global_batch / elapsed, "time/step_s": step_s,
           "progress/epoch": epoch, "progress/total_steps": float(total)}
    extra = strategy.take_metrics(steps)
    out.update(extra)
    if "time/comm_s" in extra:
        comm_s = extra["time/comm_s"]
        out["time/compute_s"] = max(0.0, step_s - comm_s)
        out["time/comm_share"] = min(1.0, comm_s / max(1e-12, step_s))
    return out
