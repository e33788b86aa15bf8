"""What runs inside one barrier task: one rank, from rendezvous to its last step.

Module-level functions and a frozen spec only, so the closure Spark pickles stays small.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sparkml_dist.config import JobConfig
from sparkml_dist.errors import USER_ERROR_MARKER, UserCodeError
from sparkml_dist.training.loop import RankPlan

RESULT_SCHEMA = ("rank int, attempt int, steps_done long, resumed_from long, metrics string, "
                 "executor string")
FAILURE_HEADER = "sparkml_dist rank {rank} attempt {attempt} failed"


@dataclass(frozen=True)
class TaskSpec:
    """Everything a rank receives from the driver."""

    config: JobConfig
    plan: RankPlan
    run_id: str
    tracking_uri: str
    secret: str = field(repr=False)
    """This attempt's rendezvous secret (:mod:`sparkml_dist.comm.sealed_store`); never logged."""
    board: tuple[str, int] | None = None
    """The driver's rendezvous board (:class:`~sparkml_dist.spark.rendezvous.DriverBoard`), or
    None: the ranks meet through ``allGather``."""


class _LogTail(logging.Handler):
    """Keeps the last lines this rank logged, for the driver's error message."""

    def __init__(self, size: int = 40) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _setup_logging() -> _LogTail:
    root = logging.getLogger()
    if not any(getattr(h, "_sparkml_dist", False) for h in root.handlers):
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        stderr._sparkml_dist = True  # type: ignore[attr-defined]
        root.addHandler(stderr)
    logging.getLogger("sparkml_dist").setLevel(logging.INFO)
    tail = _LogTail()
    root.addHandler(tail)
    return tail


def _device(ctx, cfg: JobConfig):
    import torch

    if cfg.backend.device == "cpu":
        return torch.device("cpu")
    gpus = ctx.resources().get("gpu")
    if gpus is None or not gpus.addresses:
        raise RuntimeError("backend.device=cuda but Spark assigned no GPU to this task; set "
                           "spark.task.resource.gpu.amount=1 and executor GPU resources.")
    index = int(gpus.addresses[0])
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"Spark assigned GPU {index} to this task but the Python worker sees "
                           f"{torch.cuda.device_count()} CUDA device(s) (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); make the GPU "
                           "discovery script report the indices CUDA uses on the executor.")
    torch.cuda.set_device(index)
    # The resume promise is bitwise: cuDNN's autotuned and nondeterministic kernels would break
    # it (cuBLAS is kept deterministic by CUBLAS_WORKSPACE_CONFIG, set before CUDA starts).
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torch.device("cuda", index)


def preimport() -> None:
    """Import what a rank needs only after its feed: MLflow, for the checkpoint store and the
    metrics sink (about a second in a fresh Python worker), then what building DDP pulls in
    (``torch._dynamo``, sympy...: about a second)."""
    import sparkml_dist.tracking.mlflow_store  # noqa: F401
    import torch.nn.parallel.distributed  # noqa: F401
    import torch._dynamo  # noqa: F401


def _preimport() -> None:
    """:func:`preimport` in the background while the rendezvous waits and the shard arrives, so
    a fresh Python worker (Spark starts one when the last one idled for a minute) does not pay
    for it first."""
    def work() -> None:
        try:
            preimport()
        except Exception:  # noqa: BLE001 - the real import later reports any problem
            pass

    threading.Thread(target=work, name="sparkml_dist-preimport", daemon=True).start()


def _my_shards(builder, rank: int, kind: str):
    """This rank's (train, validation) stores; the barrier loop reads one shard per rank, or
    none (empty stores: the strategy feeds the rank from its peers, as model_parallel does)."""
    shards = builder.finish_shards()
    if not shards:
        import numpy as np

        from sparkml_dist.data.shard_store import ShardStore

        dtype = np.dtype(builder.label_type.to_pandas_dtype())
        return (ShardStore([], builder.width, label_dtype=dtype),
                ShardStore([], builder.width, label_dtype=dtype))
    if len(shards) != 1:
        raise RuntimeError(f"strategy.kind={kind} gave rank {rank} shards {sorted(shards)}; the "
                           "barrier training loop reads at most one shard per rank")
    return next(iter(shards.values()))


def check_shard_sizes(plan: RankPlan, shards: tuple[int, ...], train_rows: int,
                      val_rows: int) -> None:
    """Fail the rank if the one shard it reads does not hold the rows the driver dealt to it:
    the steps per epoch, and every rank's share of them, were planned from those sizes."""
    if len(shards) != 1:  # no shard (peers feed this rank) or several: nothing planned per rank
        return
    (shard,) = shards
    want = [("training", plan.train_shard_sizes[shard], train_rows)]
    if plan.val_shard_sizes is not None:
        want.append(("validation", plan.val_shard_sizes[shard], val_rows))
    for split, dealt, got in want:
        if dealt != got:
            raise RuntimeError(f"shard {shard} received {got} {split} rows but {dealt} were dealt "
                               "to it; the prepared data changed between the driver's numbering "
                               "and this read (a nondeterministic source, e.g. a table written "
                               "during the job?). Rerun on a stable snapshot of the data.")


def _run_rank(ctx, spec: TaskSpec, batches: Iterator[pa.RecordBatch]) -> dict:
    from sparkml_dist.comm.factory import create_communicator
    from sparkml_dist.data.shard_store import ShardBuilder
    from sparkml_dist.spark.rendezvous import barrier_rendezvous
    from sparkml_dist.training.loop import NullSink, train_rank

    cfg = spec.config
    _preimport()
    endpoint, store = barrier_rendezvous(ctx, spec.plan.attempt, cfg.backend.rendezvous_timeout_s,
                                         cfg.backend.timeout_s, spec.secret, spec.board)
    t_feed = time.perf_counter()
    builder = ShardBuilder(spec.plan.in_features, int(cfg.data.shard_memory_mb * 2**20),
                           cfg.data.spill_dir,
                           pa.int64() if cfg.data.task == "classification" else pa.float32())
    layout = spec.plan.data_layout()
    builder.expected_shards = layout.shards_of_rank[endpoint.rank]
    builder.num_shards = layout.num_shards  # the batches carry no shard column
    train, val = _my_shards(builder.extend(batches), endpoint.rank, cfg.strategy.kind)
    feed_s = time.perf_counter() - t_feed
    check_shard_sizes(spec.plan, builder.expected_shards, len(train), len(val))
    logging.getLogger(__name__).info("rank %d holds %d train and %d validation rows (%.1f MiB%s)",
                                     endpoint.rank, len(train), len(val),
                                     (train.arrow_nbytes + val.arrow_nbytes) / 2**20,
                                     ", spilled" if train.spilled_path else "")
    device = _device(ctx, cfg)
    comm = create_communicator(cfg.backend, endpoint, store, device)
    try:
        # Imported in the background since the rendezvous (:func:`_preimport`): this waits for
        # that import to finish, or imports it here if it failed there.
        from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore, MlflowSink

        ckpt = (MlflowCheckpointStore(spec.tracking_uri, spec.run_id, cfg.checkpoint.keep_last,
                                      upload_timeout_s=cfg.checkpoint.upload_timeout_s)
                if cfg.checkpoint.enabled else None)
        sink = MlflowSink(spec.tracking_uri, spec.run_id) if endpoint.rank == 0 else NullSink()
        # Shuffle read + Arrow feed into the shard store, as seen by rank 0 (per attempt).
        sink.log_metrics({"time/feed_s": feed_s}, spec.plan.attempt)
        monitor = _system_metrics(spec, endpoint.rank)
        try:
            result = train_rank(cfg, spec.plan, comm, train, val, device, sink, ckpt)
        finally:
            if monitor is not None:
                monitor.finish()
    finally:
        comm.close()
        if device.type == "cuda":  # Spark reuses the worker: leave the GPU's memory to others
            import torch

            torch.cuda.empty_cache()
    return {"rank": endpoint.rank, "attempt": spec.plan.attempt, "steps_done": result.steps_done,
            "resumed_from": result.resumed_from, "metrics": json.dumps(result.metrics),
            "executor": _executor_id()}


def _system_metrics(spec: TaskSpec, rank: int) -> Any:
    """Start MLflow's system metrics monitor for this rank as node ``rank_<r>`` of the run
    (``tracking.system_metrics_interval_s``), or return None when it is off."""
    interval = spec.config.tracking.system_metrics_interval_s
    if interval is None:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(spec.run_id, sampling_interval=interval,
                                   node_id=f"rank_{rank}", tracking_uri=spec.tracking_uri)
    monitor.start()
    return monitor


def _executor_id() -> str:
    """Which executor ran this rank: its working directory and Python daemon's pid."""
    import os

    return f"{os.getcwd()}|{os.getppid()}"


def _redacted(spec: TaskSpec, text: str) -> str:
    """A failure's text without the job's secrets: Spark logs it on the executor and the driver
    before sparkml_dist sees it."""
    from sparkml_dist.config import to_dict
    from sparkml_dist.tracking.redact import Redactor

    return Redactor({"config": to_dict(spec.config), "tracking_uri": spec.tracking_uri,
                     "secret": spec.secret}).text(text)


def run_barrier_task(spec: TaskSpec, batches: Iterator[pa.RecordBatch]
                     ) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: train one rank; on failure raise an error the driver can parse."""
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    tail = _setup_logging()
    rank = ctx.partitionId()
    try:
        row = _run_rank(ctx, spec, batches)
    except BaseException as exc:
        user = isinstance(exc, UserCodeError) or USER_ERROR_MARKER in str(exc)
        header = FAILURE_HEADER.format(rank=rank, attempt=spec.plan.attempt)
        text = (f"{USER_ERROR_MARKER + ' ' if user else ''}{header}: {type(exc).__name__}: {exc}\n"
                f"--- traceback ---\n{traceback.format_exc(limit=8)}"
                f"--- last log lines of rank {rank} ---\n" + "\n".join(tail.lines))
        raise RuntimeError(_redacted(spec, text)) from None
    finally:
        logging.getLogger().removeHandler(tail)
    yield pa.RecordBatch.from_pylist([row], schema=pa.schema([
        ("rank", pa.int32()), ("attempt", pa.int32()), ("steps_done", pa.int64()),
        ("resumed_from", pa.int64()), ("metrics", pa.string()), ("executor", pa.string())]))
