"""The functions Spark runs for a round, one Arrow table in, one Arrow table out.

- :func:`train_clients`: ``groupBy(client).applyInArrow``: one call per sampled client with all
  its rows; trains it (:mod:`.client`) and returns its update, plain or masked.
- :func:`evaluate_batches`: ``mapInArrow`` over the validation rows: loss and accuracy sums.
- :func:`secagg_advertise`, :func:`secagg_share`, :func:`secagg_unmask`: the small key,
  share and unmasking steps of secure aggregation over a table of roster entries.

Module-level functions of frozen dataclasses (picklable, no closures over driver state). The
global model arrives as ``payload.value``: a Spark broadcast in classic Spark, the bytes
themselves under Spark Connect.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from sparkml_dist.data.shard_store import FEATURES, LABEL

log = logging.getLogger(__name__)

CLIENT = "__client"
"""The client-id column of the federated training frame."""

UPDATE_SCHEMA = pa.schema([
    ("client", pa.string()), ("status", pa.string()), ("num_samples", pa.int64()),
    ("loss", pa.float64()), ("steps", pa.int64()), ("norm", pa.float64()),
    ("payload", pa.binary()), ("error", pa.string()), ("attempt", pa.int32()),
    ("executor", pa.string())])
UPDATE_DDL = ("client string, status string, num_samples long, loss double, steps long, "
              "norm double, payload binary, error string, attempt int, executor string")
EVAL_DDL = "loss_sum double, correct long, sq_err double, n long"
KEYS_DDL = "idx int, c_pk binary, s_pk binary"
BLOB_DDL = "idx int, blob binary"
_KEYS = pa.schema([("idx", pa.int32()), ("c_pk", pa.binary()), ("s_pk", pa.binary())])
_BLOB = pa.schema([("idx", pa.int32()), ("blob", pa.binary())])
_EVAL = pa.schema([("loss_sum", pa.float64()), ("correct", pa.int64()), ("sq_err", pa.float64()),
                   ("n", pa.int64())])


@dataclass(frozen=True)
class Inline:
    """Stands in for a broadcast where there is none (Spark Connect): ``value`` is the bytes."""

    value: bytes


@dataclass(frozen=True)
class SecAggRound:
    """What a client needs for its secure-aggregation steps in one round."""

    job_key: bytes
    round_index: int
    threshold: int
    quant_bits: int
    roster_size: int
    index_of: dict[str, int]
    """Client id -> roster index (1..n)."""
    roster: dict[int, Any] | None = None
    """Index -> :class:`~.secagg.PublicKeys` (after the advertise step)."""


@dataclass(frozen=True)
class TrainTask:
    """One round's training stage."""

    spec: Any
    """:class:`~.client.LocalSpec`."""
    round_index: int
    payload: Any
    """Broadcast (or :class:`Inline`) of the global weights, float32 bytes."""
    weighted: bool
    """Weight updates by sample count (FedAvg) or not (client-level DP: uniform)."""
    secagg: SecAggRound | None = None
    crash_client: str | None = None
    """TEST-ONLY: this client's task exits hard on its first attempt."""


def bind(fn: Any, *args: Any) -> Any:
    """``fn`` with its leading arguments bound, as a plain one-argument function:
    ``applyInArrow`` inspects its function's signature, which a ``functools.partial`` breaks."""

    def bound(data):  # noqa: ANN001, ANN202 - no hints: Spark picks the whole-group form
        return fn(*args, data)

    return bound


def _rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    feats = table.column(FEATURES).combine_chunks()
    width = len(feats[0]) if len(feats) else 0
    x = np.array(feats.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)  # writable
    y = np.array(table.column(LABEL).to_numpy(zero_copy_only=False))
    return x.reshape(len(table), width), y


def _attempt() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return ctx.attemptNumber() if ctx is not None else 0


def _answer(client: str, status: str, *, num_samples: int = 0, loss: float = float("nan"),
            steps: int = 0, norm: float = float("nan"), payload: bytes = b"",
            error: str = "") -> pa.Table:
    return pa.Table.from_pylist([{
        "client": client, "status": status, "num_samples": num_samples, "loss": loss,
        "steps": steps, "norm": norm, "payload": payload, "error": error[-2000:],
        "attempt": _attempt(), "executor": socket.gethostname()}], schema=UPDATE_SCHEMA)


def train_clients(task: TrainTask, table: pa.Table) -> pa.Table:
    """Train the one client whose rows ``table`` holds; return its answer row."""
    import torch

    from sparkml_dist.strategies.federated.client import train_local

    torch.set_num_threads(1)
    client = str(table.column(CLIENT)[0].as_py())
    if task.crash_client == client and _attempt() == 0:
        log.error("TEST fault injection: client %s's task exits in round %d", client,
                  task.round_index)
        os._exit(17)
    try:
        x, y = _rows(table)
        global_vec = torch.from_numpy(np.frombuffer(task.payload.value, dtype=np.float32).copy())
        res = train_local(task.spec, global_vec, x, y, task.round_index, client)
        payload = upload(task, client, res.update.numpy(), res.num_samples)
    except Exception as exc:  # noqa: BLE001 - the round goes on without this client
        log.exception("client %s failed in round %d", client, task.round_index)
        return _answer(client, "error", error=f"{type(exc).__name__}: {exc}")
    return _answer(client, "ok", num_samples=res.num_samples, loss=res.loss, steps=res.steps,
                   norm=res.norm_before_clip, payload=payload)


def upload(task: TrainTask, client: str, update: np.ndarray, num_samples: int) -> bytes:
    """What the client sends: its float32 update, or under secure aggregation the field
    elements of ``[weight * update, weight]`` masked for the round."""
    if task.secagg is None:
        return np.asarray(update, dtype=np.float32).tobytes()
    from sparkml_dist.strategies.federated import field, secagg

    sa = task.secagg
    assert sa.roster is not None
    weight = float(num_samples) if task.weighted else 1.0
    x = field.quantize(np.append(np.asarray(update, np.float64) * weight, weight),
                       sa.quant_bits, sa.roster_size)
    me = secagg.SecAggClient(secagg.client_secret(sa.job_key, sa.round_index, client),
                             sa.index_of[client])
    return me.masked_input(x, sa.roster).astype("<i8").tobytes()


def evaluate_batches(spec: Any, payload: Any, batches: Iterator[pa.RecordBatch]
                     ) -> Iterator[pa.RecordBatch]:
    """Sums over validation rows under the global model: loss, correct predictions (or squared
    error for regression) and the row count, one row per input batch."""
    import torch

    from sparkml_dist.models import build_model
    from sparkml_dist.strategies.federated import weights

    torch.set_num_threads(1)
    model = build_model(spec.factory, spec.in_features, spec.num_outputs, spec.model_kwargs)
    weights.load_flat(model, torch.from_numpy(np.frombuffer(payload.value, np.float32).copy()))
    model.eval()
    for batch in batches:
        if batch.num_rows == 0:
            continue
        x, y = _rows(pa.Table.from_batches([batch]))
        with torch.no_grad():
            out = model(torch.from_numpy(x))
            if spec.task == "classification":
                yt = torch.from_numpy(y).long()
                loss = torch.nn.functional.cross_entropy(out, yt, reduction="sum")
                correct, sq = int((out.argmax(1) == yt).sum()), 0.0
            else:
                yt = torch.from_numpy(y).float().reshape(out.shape)
                loss = torch.nn.functional.mse_loss(out, yt, reduction="sum")
                correct, sq = 0, float(loss)
        yield pa.RecordBatch.from_pylist([{"loss_sum": float(loss), "correct": correct,
                                           "sq_err": sq, "n": batch.num_rows}], schema=_EVAL)


def _clients_of(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[str, int, dict]]:
    for batch in batches:
        for row in batch.to_pylist():
            yield row["client"], int(row["idx"]), row


def _me(sa: SecAggRound, client: str, idx: int):
    from sparkml_dist.strategies.federated import secagg

    return secagg.SecAggClient(secagg.client_secret(sa.job_key, sa.round_index, client), idx)


def secagg_advertise(sa: SecAggRound, batches: Iterator[pa.RecordBatch]
                     ) -> Iterator[pa.RecordBatch]:
    """Step 1: each client's two public keys."""
    out = []
    for client, idx, _ in _clients_of(batches):
        keys = _me(sa, client, idx).advertise()
        out.append({"idx": idx, "c_pk": keys.c_pk, "s_pk": keys.s_pk})
    if out:
        yield pa.RecordBatch.from_pylist(out, schema=_KEYS)


def secagg_share(sa: SecAggRound, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Step 2: each client's encrypted shares, ``{recipient: ciphertext}`` as JSON bytes."""
    assert sa.roster is not None
    out = []
    for client, idx, _ in _clients_of(batches):
        cts = _me(sa, client, idx).share_keys(sa.roster, sa.threshold)
        out.append({"idx": idx, "blob": json.dumps({str(v): ct.hex() for v, ct in
                                                    cts.items()}).encode()})
    if out:
        yield pa.RecordBatch.from_pylist(out, schema=_BLOB)


def secagg_unmask(sa: SecAggRound, survivors: frozenset[int], batches: Iterator[pa.RecordBatch]
                  ) -> Iterator[pa.RecordBatch]:
    """Step 4: each surviving client's shares for unmasking (``blob`` in: the ciphertexts
    routed to it; out: ``{sender: [kind, share]}``)."""
    assert sa.roster is not None
    out = []
    for client, idx, row in _clients_of(batches):
        incoming = {int(v): bytes.fromhex(ct) for v, ct in json.loads(row["blob"]).items()}
        shares = _me(sa, client, idx).unmask(incoming, sa.roster, set(survivors))
        out.append({"idx": idx, "blob": json.dumps({str(v): [k, s.hex()] for v, (k, s) in
                                                    shares.items()}).encode()})
    if out:
        yield pa.RecordBatch.from_pylist(out, schema=_BLOB)
