"""One federated round on the driver: ship the global model, run the clients' Spark stage(s),
and fold what came back into a running weighted sum.

Rounds are ordinary (non-barrier) stages, so Spark retries a failed client task and thousands of
clients share a few task slots. Updates come back as Arrow (``applyInArrow`` + ``toArrow``). The
global model travels as a Spark broadcast in classic Spark; Spark Connect has no broadcast, so
there it travels inside the function's closure (serialized once per task).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkml_dist.errors import TrainingFailed
from sparkml_dist.strategies.federated import field as ff
from sparkml_dist.strategies.federated import secagg, stages
from sparkml_dist.strategies.federated.fedavg import WeightedMean
from sparkml_dist.strategies.federated.stages import CLIENT

log = logging.getLogger(__name__)


def ship(spark: Any, data: bytes) -> Any:
    """A broadcast of ``data`` (classic Spark), or :class:`stages.Inline` (Spark Connect)."""
    try:
        sc = spark.sparkContext
    except Exception:  # noqa: BLE001 - Spark Connect: no SparkContext on the client
        return stages.Inline(data)
    return sc.broadcast(data)


def unship(carrier: Any) -> None:
    if hasattr(carrier, "unpersist") and not isinstance(carrier, stages.Inline):
        try:
            carrier.unpersist()
        except Exception as exc:  # noqa: BLE001 - best effort
            log.debug("could not unpersist a broadcast: %s", exc)


def bounded(spark: Any, what: str, action: Callable[[], Any], deadline: float) -> Any:
    """Run a Spark action in a worker thread under a job tag; past ``deadline`` (monotonic)
    interrupt the tagged jobs and raise :class:`TrainingFailed`."""
    tag = f"sparkml-dist-fed-{uuid.uuid4().hex[:12]}"

    def tagged() -> Any:
        spark.addTag(tag)
        try:
            return action()
        finally:
            spark.removeTag(tag)

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sparkml_dist-round")
    future = pool.submit(tagged)
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        spark.interruptTag(tag)
        raise TrainingFailed(f"{what} did not finish within strategy.round_timeout_s; its Spark "
                             "jobs were cancelled. Raise strategy.round_timeout_s or lower "
                             "strategy.clients_per_round / local work.") from None
    finally:
        pool.shutdown(wait=False)


@dataclass
class RoundResult:
    """What the server got in one round."""

    acc: WeightedMean
    answered: dict[str, dict[str, Any]]
    """Client id -> its answer (num_samples, loss, steps, norm, attempt)."""
    missing: dict[str, str]
    """Sampled clients whose update did not count -> why."""
    bytes_up: int = 0
    bytes_down: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundPlan:
    """The driver's inputs to one round."""

    round_index: int
    sampled: list[Any]
    """Original client values, in sorted order."""
    dropped: set[str]
    """Simulated drop-outs (updates discarded on arrival)."""
    deadline: float


def _train_stage(spark: Any, train: DataFrame, plan: RoundPlan, task: stages.TrainTask,
                 everyone: bool) -> pa.Table:
    frame = train if everyone else train.where(F.col(CLIENT).isin(plan.sampled))
    out = frame.groupBy(CLIENT).applyInArrow(stages.bind(stages.train_clients, task),
                                             stages.UPDATE_DDL)
    return bounded(spark, f"round {plan.round_index} training", out.toArrow, plan.deadline)


def _sort_answers(table: pa.Table, plan: RoundPlan) -> tuple[dict[str, dict], dict[str, str]]:
    """Split the answers into counted ones and reasons for the rest; refuse duplicates."""
    answered: dict[str, dict] = {}
    missing: dict[str, str] = {}
    seen: set[str] = set()
    for row in table.to_pylist():
        cid = row["client"]
        if cid in seen:
            raise TrainingFailed(f"round {plan.round_index}: client {cid} answered twice")
        seen.add(cid)
        if row["status"] != "ok":
            missing[cid] = row["error"] or row["status"]
        elif cid in plan.dropped:
            missing[cid] = "dropped (simulated): the update never reached the server"
        else:
            answered[cid] = row
    for c in plan.sampled:
        if str(c) not in seen:
            missing[str(c)] = "no answer from its task"
    return answered, missing


def plain_round(spark: Any, train: DataFrame, plan: RoundPlan, task: stages.TrainTask,
                size: int, everyone: bool) -> RoundResult:
    """Clients send float32 updates in the clear; the server sums them as they are read."""
    table = _train_stage(spark, train, plan, task, everyone)
    answered, missing = _sort_answers(table, plan)
    acc = WeightedMean(size)
    up = 0
    for cid, row in answered.items():
        up += len(row["payload"])
        weight = float(row["num_samples"]) if task.weighted else 1.0
        acc.add(torch.from_numpy(np.frombuffer(row["payload"], dtype=np.float32).copy()), weight)
    return RoundResult(acc, answered, missing, bytes_up=up,
                       bytes_down=len(task.payload.value) * len(plan.sampled))


def _small_stage(spark: Any, rows: list[tuple], fn: Callable, ddl: str, what: str,
                 deadline: float) -> list[dict]:
    df = spark.createDataFrame(rows, "client string, idx int, blob binary")
    return bounded(spark, what, df.mapInArrow(fn, ddl).toArrow, deadline).to_pylist()


def secure_round(spark: Any, train: DataFrame, plan: RoundPlan, task: stages.TrainTask,
                 size: int, everyone: bool, threshold_fraction: float,
                 quant_bits: int, job_key: bytes) -> RoundResult:
    """Secure aggregation (:mod:`.secagg`): keys, shares, masked training, unmasking; the
    driver only ever handles public keys, ciphertexts, masked vectors and the final sum."""
    r, ids = plan.round_index, [str(c) for c in plan.sampled]
    n = len(ids)
    sa = stages.SecAggRound(job_key=job_key, round_index=r,
                            threshold=secagg.threshold_for(n, threshold_fraction),
                            quant_bits=quant_bits, roster_size=n,
                            index_of={c: i + 1 for i, c in enumerate(ids)})
    rows = [(c, i + 1, b"") for i, c in enumerate(ids)]
    keys = _small_stage(spark, rows, stages.bind(stages.secagg_advertise, sa),
                        stages.KEYS_DDL, f"round {r} key advertisement", plan.deadline)
    roster = {k["idx"]: secagg.PublicKeys(k["idx"], k["c_pk"], k["s_pk"]) for k in keys}
    if len(roster) != n:
        raise TrainingFailed(f"round {r}: {n - len(roster)} clients did not advertise keys")
    sa = replace(sa, roster=roster)
    shares = _small_stage(spark, rows, stages.bind(stages.secagg_share, sa),
                          stages.BLOB_DDL, f"round {r} key sharing", plan.deadline)
    routed = secagg.route({s["idx"]: {int(v): bytes.fromhex(ct) for v, ct in
                                      json.loads(s["blob"]).items()} for s in shares})
    task = replace(task, secagg=sa)
    answered, missing = _sort_answers(_train_stage(spark, train, plan, task, everyone), plan)
    if len(answered) < sa.threshold:
        raise TrainingFailed(f"round {r}: {len(answered)} masked updates arrived; secure "
                             f"aggregation needs {sa.threshold} (strategy.secure_aggregation."
                             f"threshold={threshold_fraction} of {n}) to unmask the sum. Who "
                             f"did not: {dict(list(missing.items())[:5])}")
    server = secagg.SecAggServer(roster, sa.threshold, size + 1)
    up = 0
    for cid, row in answered.items():
        up += len(row["payload"])
        server.add_masked(sa.index_of[cid], np.frombuffer(row["payload"], dtype="<i8").copy())
    survivors = frozenset(sa.index_of[c] for c in answered)
    unmask_rows = [(c, sa.index_of[c], json.dumps({str(v): ct.hex() for v, ct in
                                                   routed[sa.index_of[c]].items()}).encode())
                   for c in answered]
    answers = _small_stage(spark, unmask_rows,
                           stages.bind(stages.secagg_unmask, sa, survivors),
                           stages.BLOB_DDL, f"round {r} unmasking", plan.deadline)
    responses = {a["idx"]: {int(v): (k, bytes.fromhex(s)) for v, (k, s) in
                            json.loads(a["blob"]).items()} for a in answers}
    total = ff.dequantize(server.unmask(responses), quant_bits)
    acc = WeightedMean(size)
    acc.add_sum(torch.from_numpy(total[:-1]), float(total[-1]), len(answered))
    protocol = sum(len(k["c_pk"]) + len(k["s_pk"]) for k in keys) + sum(
        len(s["blob"]) for s in shares) + sum(len(a["blob"]) for a in answers)
    return RoundResult(acc, answered, missing, bytes_up=up + protocol,
                       bytes_down=len(task.payload.value) * n,
                       extra={"secagg/protocol_bytes": float(protocol),
                              "secagg/threshold": float(sa.threshold)})
