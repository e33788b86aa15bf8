"""The federated server: :func:`fit_federated` runs the rounds of one job on the driver.

Per round: sample clients (seeded by (seed, round)), stop first if the privacy budget would be
exceeded, run the clients (:mod:`.rounds`), add central DP noise, apply the server optimizer,
evaluate, log to the job's one MLflow run, and checkpoint. A resumed job (same run) continues
from the newest complete round checkpoint and ends bitwise where an uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkml_dist.config import JobConfig
from sparkml_dist.data.shard_store import FEATURES, LABEL
from sparkml_dist.errors import ConfigError, DataError, TrainingFailed
from sparkml_dist.strategies.federated import rounds, sampling, stages, weights
from sparkml_dist.strategies.federated.client import LocalSpec, SampleDP, local_steps
from sparkml_dist.strategies.federated.config import FederatedConfig
from sparkml_dist.strategies.federated.fedopt import ServerOptimizer, ServerOptSettings
from sparkml_dist.strategies.federated.privacy import PrivacyLedger, gaussian_noise
from sparkml_dist.strategies.federated.stages import CLIENT
from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore
from sparkml_dist.training.checkpoint import check_fingerprint

log = logging.getLogger(__name__)

_VAL_BUCKETS = 1_000_000


@dataclass(frozen=True)
class ClientData:
    """The training rows keyed by client, the central validation rows, and what they hold."""

    train: DataFrame
    val: DataFrame | None
    clients: list[Any]
    """Distinct client values with training rows, sorted."""
    rows: dict[str, int]
    """Client id (``str`` of its value) -> training rows."""
    in_features: int
    classes: tuple[Any, ...]
    num_outputs: int


def prepare_clients(spark: Any, df: DataFrame, cfg: JobConfig, fed: FederatedConfig
                    ) -> ClientData:
    """Validate the data (``assemble``), attach the client id, hold out ``data.val_fraction``
    of rows by content hash as the central validation set, and persist both."""
    from sparkml_dist.spark.prepare import assemble

    if fed.client_col is None:
        df, keep = df.withColumn(CLIENT, F.spark_partition_id()), CLIENT
    elif fed.client_col not in df.columns:
        raise DataError(f"client column {fed.client_col!r} not found; columns are: "
                        f"{', '.join(df.columns)}. Set strategy.client_col (or unset it to use "
                        "the DataFrame's partitions as clients).")
    else:
        keep = fed.client_col
    a = assemble(spark, df, cfg.data, keep=(keep,))
    frame = a.frame if keep == CLIENT else a.frame.withColumnRenamed(keep, CLIENT)
    val = None
    if cfg.data.val_fraction > 0:
        bucket = F.pmod(F.xxhash64(F.lit(cfg.training.seed), F.col(FEATURES), F.col(LABEL)),
                        F.lit(_VAL_BUCKETS))
        is_val = bucket < F.lit(int(cfg.data.val_fraction * _VAL_BUCKETS))
        val = frame.where(is_val).select(FEATURES, LABEL).persist()
        frame = frame.where(~is_val)
    counts = {r[0]: int(r[1]) for r in frame.groupBy(CLIENT).count().collect()}
    if None in counts:
        raise DataError(f"client column {fed.client_col!r} has {counts[None]} rows with a null "
                        "client; drop or fill them.")
    clients = sorted(counts, key=lambda v: (str(type(v)), v))
    if not clients:
        raise DataError("no training rows are left for any client; lower data.val_fraction.")
    # Laid out by client once: every round's groupBy(client) then reuses this partitioning
    # (no shuffle per round, and clients spread over the task slots), and a client's rows reach
    # it in content-hash order, so a retried task or a resumed job sees the same row order.
    parts = max(1, min(len(clients), int(spark.conf.get("spark.sql.shuffle.partitions", "200"))))
    train = (frame.repartition(parts, F.col(CLIENT))
             .sortWithinPartitions(CLIENT, F.xxhash64(F.col(FEATURES), F.col(LABEL)))
             .persist())
    log.info("federated data: %d clients, %d training rows (%d to %d per client)",
             len(clients), sum(counts.values()), min(counts.values()), max(counts.values()))
    return ClientData(train=train, val=val, clients=clients,
                      rows={str(c): n for c, n in counts.items()}, in_features=a.in_features,
                      classes=a.classes, num_outputs=a.num_outputs)


def _local_spec(cfg: JobConfig, fed: FederatedConfig, data: ClientData) -> LocalSpec:
    p = fed.privacy
    client_dp = p is not None and p.level == "client"
    return LocalSpec(
        factory=cfg.model.factory, model_kwargs=dict(cfg.model.kwargs),
        in_features=data.in_features, num_outputs=data.num_outputs, task=cfg.data.task,
        optimizer=cfg.optimizer, local_epochs=fed.local_epochs, local_steps=fed.local_steps,
        batch_size=fed.local_batch_size, proximal_mu=fed.proximal_mu, seed=cfg.training.seed,
        sample_dp=SampleDP(p.clip_norm, p.noise_multiplier) if p and p.level == "sample" else None,
        clip_norm=p.clip_norm if client_dp else None,
        local_noise=p.noise_multiplier if client_dp and p.noise_at == "client" else 0.0)


class _Server:
    """The server's state: global weights, server optimizer, privacy ledger."""

    def __init__(self, cfg: JobConfig, fed: FederatedConfig, data: ClientData) -> None:
        from sparkml_dist.models import build_model

        torch.manual_seed(cfg.training.seed)
        self.model = build_model(cfg.model.factory, data.in_features, data.num_outputs,
                                 cfg.model.kwargs)
        self.vec = weights.flatten(self.model)
        self.opt = ServerOptimizer(ServerOptSettings(
            fed.server_optimizer, fed.server_lr, fed.server_beta1, fed.server_beta2,
            fed.server_tau), self.vec.numel())
        p = fed.privacy
        n = len(data.clients)
        rate = 1.0 if fed.clients_per_round is None else min(1.0, fed.clients_per_round / n)
        self.ledger = None if p is None else PrivacyLedger(
            p.level, p.noise_at, p.noise_multiplier, p.delta, p.accountant, rate)
        self.rounds_done = 0

    def fingerprint(self, fed: FederatedConfig) -> dict[str, Any]:
        """What a resumed job must match for this state to mean the same thing."""
        p = fed.privacy
        return {"strategy": "federated", "weights": self.vec.numel(),
                "server_optimizer": fed.server_optimizer,
                "privacy": None if p is None else f"{p.level}/{p.noise_at}"}

    def state_dict(self) -> dict[str, Any]:
        weights.load_flat(self.model, self.vec)
        return {"rounds_done": self.rounds_done,
                "model": {k: v.clone() for k, v in self.model.state_dict().items()},
                "server": self.opt.state_dict(),
                "privacy": self.ledger.state_dict() if self.ledger else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.vec = weights.flatten(self.model)
        self.opt.load_state_dict(state["server"])
        if self.ledger is not None and state["privacy"] is not None:
            self.ledger.load_state_dict(state["privacy"])
        self.rounds_done = int(state["rounds_done"])

    def save(self, store: MlflowCheckpointStore, fed: FederatedConfig) -> None:
        """Checkpoint after ``rounds_done`` rounds (``steps_done`` counts rounds here)."""
        store.save(self.state_dict(), {"steps_done": self.rounds_done, "epoch": self.rounds_done,
                                       "step_in_epoch": 0, "fingerprint": self.fingerprint(fed)})

    def resume(self, store: MlflowCheckpointStore, fed: FederatedConfig) -> None:
        loaded = store.load_latest()
        if loaded is None:
            return
        state, meta = loaded
        check_fingerprint(f"round checkpoint {meta.steps_done}", meta.fingerprint,
                          self.fingerprint(fed))
        self.load_state_dict(state)
        log.info("resuming the federated job after round %d", self.rounds_done)


def _evaluate(spark: Any, val: DataFrame, spec: LocalSpec, vec: torch.Tensor,
              deadline: float) -> dict[str, float]:
    
    carrier = rounds.ship(spark, vec.numpy().tobytes())
    try:
        out = val.mapInArrow(stages.bind(stages.evaluate_batches, spec, carrier),
                             stages.EVAL_DDL)
        t = rounds.bounded(spark, "validation", out.toArrow, deadline)
    finally:
        rounds.unship(carrier)
    n = int(sum(t.column("n").to_pylist()))
    if n == 0:
        return {}
    metrics = {"val/loss": sum(t.column("loss_sum").to_pylist()) / n}
    if spec.task == "classification":
        metrics["val/accuracy"] = sum(t.column("correct").to_pylist()) / n
    else:
        metrics["val/rmse"] = float(np.sqrt(sum(t.column("sq_err").to_pylist()) / n))
    return metrics


def _log_metrics(run: Any, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    run.client.log_batch(run.run_id, metrics=[Metric(k, float(v), now, step)
                                              for k, v in metrics.items()
                                              if v is not None and np.isfinite(v)])


def _row_rate(fed: FederatedConfig, rows: int) -> float:
    return min(1.0, fed.local_batch_size / rows)


def _one_round(spark: Any, data: ClientData, spec: LocalSpec, fed: FederatedConfig,
               server: _Server, r: int, sampled: list[Any], job_key: bytes
               ) -> rounds.RoundResult:
    """Run round ``r`` for ``sampled`` and return what the server received."""
    ids = [str(c) for c in sampled]
    plan = rounds.RoundPlan(r, sampled, sampling.dropouts(ids, fed.simulate_dropout,
                                                          spec.seed, r),
                            time.monotonic() + fed.round_timeout_s)
    carrier = rounds.ship(spark, server.vec.numpy().tobytes())
    crash = fed.inject_crash
    task = stages.TrainTask(spec=spec, round_index=r, payload=carrier,
                            weighted=fed.privacy is None or fed.privacy.level == "sample",
                            crash_client=crash.client if crash and crash.round == r else None)
    everyone = len(sampled) == len(data.clients)
    try:
        if fed.secure_aggregation is None:
            return rounds.plain_round(spark, data.train, plan, task, server.vec.numel(),
                                      everyone)
        sa = fed.secure_aggregation
        return rounds.secure_round(spark, data.train, plan, task, server.vec.numel(), everyone,
                                   sa.threshold, sa.quant_bits, job_key)
    finally:
        rounds.unship(carrier)


def _server_step(fed: FederatedConfig, server: _Server, res: rounds.RoundResult,
                 seed: int, r: int, num_clients: int) -> float:
    """Add central noise when configured, average, apply the server optimizer; return the norm
    of the averaged update."""
    p = fed.privacy
    denominator = None
    if p is not None and p.level == "client":
        # DP-FedAvg: uniform weights over the EXPECTED number of clients (fixed sensitivity).
        denominator = float(fed.clients_per_round or num_clients)
        if p.noise_at == "server" and p.noise_multiplier > 0:
            gen = torch.Generator().manual_seed(
                int(np.random.default_rng([seed, r, 0xC0]).integers(2**62)))
            res.acc.add_sum(gaussian_noise(server.vec.numel(), p.noise_multiplier * p.clip_norm,
                                           gen), 0.0, 0)
    delta = res.acc.mean(denominator)
    server.vec = server.opt.step(server.vec, delta)
    return float(torch.linalg.vector_norm(delta))


def fit_federated(spark: Any, df: DataFrame, cfg: JobConfig, run: Any,
                  fed: FederatedConfig | None = None) -> dict[str, Any]:
    """Run a federated job into ``run`` (a :class:`~sparkml_dist.tracking.run.JobRun`; the
    caller creates and finishes it). ``fed`` defaults to ``cfg.strategy``.

    Returns ``{"metrics", "rounds", "epsilon", "stopped_by_budget", "model_uri", "weights"}``.
    """
    fed = fed if fed is not None else getattr(cfg, "strategy", None)
    if not isinstance(fed, FederatedConfig):
        raise ConfigError(f"fit_federated needs strategy.kind=federated; got {fed!r}.")
    data = prepare_clients(spark, df, cfg, fed)
    try:
        return _run(spark, data, cfg, fed, run)
    finally:
        for frame in (data.train, data.val):
            if frame is not None:
                frame.unpersist()


def _run(spark: Any, data: ClientData, cfg: JobConfig, fed: FederatedConfig,
         run: Any) -> dict[str, Any]:
    spec = _local_spec(cfg, fed, data)
    server = _Server(cfg, fed, data)
    store = MlflowCheckpointStore(run.tracking_uri, run.run_id, cfg.checkpoint.keep_last) \
        if cfg.checkpoint.enabled else None
    if store is not None:
        server.resume(store, fed)
    run.set_tags({"sparkml_dist.strategy": "federated",
                  "sparkml_dist.resume_guarantee": "bitwise",
                  "sparkml_dist.federated.clients": len(data.clients)})
    job_key = os.urandom(32)  # secure aggregation only; never stored or logged
    seed, final, stopped, eps = cfg.training.seed, {}, False, 0.0
    for r in range(server.rounds_done, fed.rounds):
        idx = sampling.sample_clients(len(data.clients), fed.clients_per_round, fed.sampling,
                                      seed, r)
        sampled = [data.clients[i] for i in idx]
        if not sampled:
            log.warning("round %d sampled no client (Poisson sampling); the model is unchanged", r)
        if server.ledger is not None and fed.privacy.epsilon_budget is not None:
            info = {str(c): (_row_rate(fed, data.rows[str(c)]),
                             local_steps(spec, data.rows[str(c)])) for c in sampled}
            projected = server.ledger.epsilon(info, extra_round=True)
            if projected > fed.privacy.epsilon_budget:
                stopped = True
                msg = (f"privacy budget: round {r + 1} would take epsilon to {projected:.4g} > "
                       f"strategy.privacy.epsilon_budget={fed.privacy.epsilon_budget}")
                log.warning("stopping: %s", msg)
                run.set_tags({"sparkml_dist.federated.stopped": msg})
                break
        # Validation metrics carry over from the round that last evaluated.
        final = {**final, **_round_and_log(spark, data, spec, cfg, fed, server, r, sampled,
                                           job_key, run)}
        eps = final.get("privacy/epsilon", eps)
        if store is not None:
            server.save(store, fed)
    model_uri = None
    if cfg.tracking.log_model and server.rounds_done > 0:
        weights.load_flat(server.model, server.vec)
        example = np.asarray([r[0] for r in data.train.select(FEATURES).limit(5).collect()],
                             dtype=np.float32)
        # Linked to the last round's metrics: they are logged at step ``rounds_done``.
        model_uri = run.log_model(server.model, example, data.classes,
                                  cfg.tracking.registered_model_name, step=server.rounds_done)
    if server.ledger is not None:
        eps = server.ledger.epsilon()
    return {"metrics": final, "rounds": server.rounds_done, "epsilon": eps,
            "stopped_by_budget": stopped, "model_uri": model_uri, "weights": server.vec.clone(),
            "clients": len(data.clients)}


def _round_and_log(spark: Any, data: ClientData, spec: LocalSpec, cfg: JobConfig,
                   fed: FederatedConfig, server: _Server, r: int, sampled: list[Any],
                   job_key: bytes, run: Any) -> dict[str, float]:
    """One round end to end: clients, server step, ledger, evaluation, MLflow."""
    t0 = time.monotonic()
    metrics: dict[str, float] = {"fed/clients_sampled": len(sampled)}
    if sampled:
        res = _one_round(spark, data, spec, fed, server, r, sampled, job_key)
        if len(res.answered) < fed.min_answered_fraction * len(sampled) or not res.answered:
            raise TrainingFailed(
                f"round {r}: {len(res.answered)} of {len(sampled)} sampled clients answered, "
                f"below strategy.min_answered_fraction={fed.min_answered_fraction}. Who did "
                f"not: {dict(list(res.missing.items())[:10])}")
        if res.missing:
            log.warning("round %d: %d of %d clients did not count: %s", r, len(res.missing),
                        len(sampled), dict(list(res.missing.items())[:10]))
            run.client.log_dict(run.run_id, res.missing, f"clients/missing-round-{r:06d}.json")
        metrics["fed/update_norm"] = _server_step(fed, server, res, spec.seed, r,
                                                  len(data.clients))
        losses = [(a["loss"], a["num_samples"]) for a in res.answered.values()]
        metrics.update({
            "fed/clients_answered": len(res.answered), "fed/clients_missing": len(res.missing),
            "fed/bytes_up": res.bytes_up, "fed/bytes_down": res.bytes_down,
            "fed/retried_tasks": sum(1 for a in res.answered.values() if a["attempt"] > 0),
            "train/loss": sum(l * n for l, n in losses) / max(1, sum(n for _, n in losses)),
            **res.extra})
        if server.ledger is not None:
            server.ledger.record({c: (_row_rate(fed, data.rows[c]), int(a["steps"]))
                                  for c, a in res.answered.items()})
    server.rounds_done = r + 1
    if server.ledger is not None:
        metrics["privacy/epsilon"] = server.ledger.epsilon()
        metrics["privacy/delta"] = fed.privacy.delta
    if data.val is not None and (server.rounds_done % fed.eval_every_rounds == 0
                                 or server.rounds_done == fed.rounds):
        metrics.update(_evaluate(spark, data.val, spec, server.vec,
                                 time.monotonic() + fed.round_timeout_s))
    metrics["time/round_s"] = time.monotonic() - t0
    _log_metrics(run, metrics, server.rounds_done)
    log.info("round %d/%d: %s", server.rounds_done, fed.rounds,
             {k: round(v, 4) for k, v in metrics.items()})
    return metrics
