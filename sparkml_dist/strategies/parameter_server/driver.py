"""``strategy.kind: parameter_server`` on the driver: prepare the data, start the servers,
run the workers as one ordinary Spark stage, read the trained parameters back, evaluate, and
log everything into the job's one MLflow run."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric
from pyspark.sql import functions as F

from sparkml_dist.algo.ps import StalenessHistogram
from sparkml_dist.config import JobConfig, ParameterServerConfig
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.data.shard_store import SPLIT
from sparkml_dist.errors import ClusterError, ConfigError, TrainingFailed
from sparkml_dist.strategies.parameter_server.client import Servers
from sparkml_dist.strategies.parameter_server.cuts import (
    RESUME_GUARANTEE, CutCollector, fingerprint, load_cut)
from sparkml_dist.strategies.parameter_server.plan import JobPlan, plan_job, worker_task
from sparkml_dist.strategies.parameter_server.processes import ServerGroup
from sparkml_dist.strategies.parameter_server.worker import (
    RESULT_DDL, WorkerTask, run_worker_task)
from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore

log = logging.getLogger(__name__)


def driver_host(spark: Any) -> str:
    """The address executors reach the driver at (``spark.driver.host``)."""
    from sparkml_dist.spark.rendezvous import driver_address

    host = driver_address(spark)
    if not host:
        raise ClusterError("strategy.kind=parameter_server starts its servers on the driver and "
                           "needs spark.driver.host (classic Spark; not a Spark Connect client).")
    return host


def check_before_run(spark: Any, cfg: JobConfig, conf: Any) -> None:
    """What a parameter-server job checks before its MLflow run exists: the environment
    (``fault.inject`` only in tests, ``data.spill_dir``), the network's encryption and the
    executors' Python (``conf(key)`` reads a Spark setting, "" when unset). The servers' wire
    is authenticated (HMAC-SHA256 under a per-job secret) but not encrypted, so a cluster that
    encrypts its own traffic (``spark.ssl.enabled``, ``spark.network.crypto.enabled``) refuses
    the job unless ``backend.allow_unencrypted`` is true. The tracking store is not checked
    against the executors: in this strategy only the driver writes to the run."""
    from sparkml_dist.driver_checks import check_encryption, check_environment
    from sparkml_dist.spark.preflight import check_executors
    from sparkml_dist.tracking.mlflow_store import default_tracking_uri

    check_environment(cfg, conf("spark.master"))
    check_encryption(cfg, conf, (
        "strategy.kind=parameter_server sends parameters and gradients between the executors "
        "and the servers on the driver unencrypted (authenticated per job, not encrypted)",
        "parameters and gradients cross the network to the parameter servers"))
    check_executors(spark, cfg.training.num_workers,
                    default_tracking_uri(cfg.tracking.tracking_uri))


def _check(spark: Any, cfg: JobConfig, ps: ParameterServerConfig) -> None:
    from sparkml_dist.spark.preflight import available_slots

    if cfg.data.scale != "none":
        raise ConfigError("strategy.kind=parameter_server does not support data.scale yet; "
                          f"got data.scale={cfg.data.scale}. Set data.scale=none.")
    w = cfg.training.num_workers
    bad = [r for r in ps.straggler_sleep_s if r >= w]
    if bad:
        raise ConfigError(f"strategy.straggler_sleep_s names workers {bad}, but "
                          f"training.num_workers={w} (workers 0..{w - 1}).")
    slots = available_slots(spark)
    if slots is None or slots >= w:
        return
    if ps.mode != "async":
        raise ClusterError(f"strategy.mode={ps.mode} needs all {w} workers running at once, but "
                           f"the session has {slots} task slots. Lower training.num_workers or "
                           "add executors.")
    ck = cfg.checkpoint
    if ck.enabled and (cfg.training.epochs > 1 or ck.every_steps > 0):
        # Every pull at a cut step waits for all workers (a consistent cut): the workers that
        # run first would wait for those that never got a slot until backend.timeout_s.
        raise ClusterError(
            f"strategy.mode=async with checkpoint.enabled=true cuts a checkpoint before the last "
            f"step (training.epochs={cfg.training.epochs}, checkpoint.every_steps="
            f"{ck.every_steps}), where all training.num_workers={w} workers must meet, but the "
            f"session has {slots} task slots. Lower training.num_workers to {slots}, add "
            "executors, or set checkpoint.enabled=false.")


def fit_parameter_server(spark: Any, df: Any, cfg: JobConfig, run: Any) -> dict[str, Any]:
    """Run a parameter-server job into ``run`` (a :class:`~sparkml_dist.tracking.run.JobRun`;
    the caller creates and finishes it). Returns ``{"metrics", "model_uri", "workers" (each
    worker's report), "ranks" (the same without per-step lists), "servers", "state"}``."""
    from sparkml_dist.driver_checks import check_prepared
    from sparkml_dist.spark.prepare import prepare

    ps = cfg.strategy
    if not isinstance(ps, ParameterServerConfig):
        raise ConfigError(f"fit_parameter_server needs strategy.kind=parameter_server; got {ps!r}")
    _check(spark, cfg, ps)
    layout = DataLayout.one_per_rank(cfg.training.num_workers)
    prepared = prepare(spark, df, cfg.data, layout, cfg.training.seed)
    try:
        check_prepared(cfg, prepared.train_shard_sizes, prepared.classes)
        return _run(spark, prepared, cfg, ps, run)
    finally:
        prepared.release()


def _run(spark: Any, prepared: Any, cfg: JobConfig, ps: ParameterServerConfig,
         run: Any) -> dict[str, Any]:
    w = cfg.training.num_workers
    plan = plan_job(cfg, prepared.in_features, prepared.num_outputs,
                    prepared.train_shard_sizes)
    store = MlflowCheckpointStore(run.tracking_uri, run.run_id, cfg.checkpoint.keep_last) \
        if cfg.checkpoint.enabled else None
    cut = load_cut(store, cfg) if store is not None else None
    secret = os.urandom(32)  # authenticates every frame; travels only in the task closure
    group = ServerGroup(driver_host(spark), secret, cfg.backend.rendezvous_timeout_s)
    if store is not None:
        plan.specs = [dataclasses.replace(s, cut_every=cfg.checkpoint.every_steps,
                                          cut_dir=str(group.cut_dir)) for s in plan.specs]
    try:
        endpoints = group.start(plan.specs, plan.initial_values(), ps.replicas,
                                cut[1] if cut else None)
        if cut:
            log.info("resuming the parameter-server job from its cut at step %d", cut[0])
        run.set_tags({"sparkml_dist.strategy": "parameter_server",
                      "sparkml_dist.ps.mode": ps.mode,
                      "sparkml_dist.ps.servers": json.dumps(group.describe()),
                      "sparkml_dist.ps.resumed_from": cut[0] if cut else 0,
                      "sparkml_dist.resume_guarantee": RESUME_GUARANTEE[ps.mode] if store
                      else "none: checkpoint.enabled=false",
                      "sparkml_dist.world_size": w})
        run.log_params({"data.rows_train": sum(prepared.train_shard_sizes),
                        "data.rows_val": sum(prepared.val_shard_sizes),
                        "data.in_features": prepared.in_features,
                        "ps.shard_values": plan.sizes})
        task = worker_task(plan, cfg, endpoints, secret, prepared.in_features,
                           prepared.num_outputs, prepared.layout.shards_of_rank)
        workers, wall = _train(prepared, task, group, plan, store, cfg)
        # The driver reads from whichever server of each shard still serves (failover).
        client = Servers(endpoints, secret, cfg.backend.timeout_s, plan.sizes)
        try:
            values, server_reports = client.state(), client.reports()
        finally:
            client.close()
    finally:
        group.stop()
    plan.load(values)
    model = plan.model
    metrics = _log_results(prepared, cfg, run, task, model, workers, server_reports, wall)
    model_uri = _finish(prepared, cfg, run, model, plan.total_steps, store)
    ranks = [{k: v for k, v in r.items() if k not in ("stamps", "losses")} for r in workers]
    return {"metrics": metrics, "model_uri": model_uri, "workers": workers, "ranks": ranks,
            "servers": server_reports, "state": {k: v.detach().clone()
                                                 for k, v in model.state_dict().items()}}


def _failovers(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for r in workers for f in r.get("failovers", [])]


def _last_line(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("ServerLost: ", "ServerError: ", "RuntimeError: "):
        if marker in text:
            return text[text.rindex(marker):].splitlines()[0]
    return text[-2000:]


def _evaluate(prepared: Any, cfg: JobConfig, task: WorkerTask, model: torch.nn.Module
              ) -> dict[str, float]:
    """Validation loss and accuracy (or RMSE) of ``model`` over the validation rows, in one
    Spark stage (federated's evaluation; it reads the model's factory, sizes and task from
    ``task``)."""
    from sparkml_dist.strategies.federated import stages, weights

    if not sum(prepared.val_shard_sizes):
        return {}
    spec = dataclasses.replace(task, secret=b"")
    payload = stages.Inline(weights.flatten(model).numpy().tobytes())
    val = prepared.frame.filter(F.col(SPLIT) == 1)
    t = val.mapInArrow(functools.partial(stages.evaluate_batches, spec, payload),
                       stages.EVAL_DDL).toArrow()
    n = int(sum(t.column("n").to_pylist()))
    out = {"val/loss": sum(t.column("loss_sum").to_pylist()) / n}
    if cfg.data.task == "classification":
        out["val/accuracy"] = sum(t.column("correct").to_pylist()) / n
    else:
        out["val/rmse"] = float(np.sqrt(sum(t.column("sq_err").to_pylist()) / n))
    return out


def _log_results(prepared: Any, cfg: JobConfig, run: Any, task: WorkerTask,
                 model: torch.nn.Module,
                 workers: list[dict[str, Any]], servers: list[dict[str, Any]], wall: float
                 ) -> dict[str, float]:
    tc = cfg.training
    hist = StalenessHistogram()
    for s in servers:
        hist.merge({int(k): v for k, v in s["report"]["staleness"].items()})
    samples = sum(r["steps"] for r in workers) * tc.batch_size
    metrics: dict[str, float] = {
        "ps/samples_per_s": samples / wall if wall > 0 else 0.0, "time/train_s": wall,
        "ps/staleness_mean": hist.mean(), "ps/staleness_max": float(hist.max()),
        "ps/staleness_p90": float(hist.quantile(0.9)),
        "ps/failovers": float(len(_failovers(workers))),
        "ps/bytes_pushed": float(sum(r["bytes_out"] for r in workers)),
        "ps/bytes_pulled": float(sum(r["bytes_in"] for r in workers)),
        "ps/pull_s": sum(r["pull_s"] for r in workers),
        "ps/push_s": sum(r["push_s"] for r in workers)}
    for r in workers:
        metrics[f"ps/worker_{r['worker']}/steps_per_s"] = \
            r["steps"] / r["seconds"] if r["seconds"] > 0 else 0.0
    # While every worker runs, the job consumes the sum of the workers' own rates.
    metrics["ps/aggregate_samples_per_s"] = tc.batch_size * sum(
        metrics[f"ps/worker_{r['worker']}/steps_per_s"] for r in workers)
    metrics.update(_evaluate(prepared, cfg, task, model))
    now = int(time.time() * 1000)
    rows = [Metric(k, float(v), now, 0) for k, v in metrics.items() if np.isfinite(v)]
    # Train loss per global step: the mean over workers of their loss at that step.
    by_step: dict[int, list[float]] = {}
    for r in workers:
        for (step, *_), loss in zip(r["stamps"], r["losses"]):
            by_step.setdefault(step, []).append(loss)
    rows += [Metric("train/loss", float(np.mean(v)), now, s) for s, v in sorted(by_step.items())
             if s % tc.log_every_steps == 0 or s == max(by_step)]
    for i in range(0, len(rows), 900):
        run.client.log_batch(run.run_id, metrics=rows[i:i + 900])
    run.client.log_dict(run.run_id, {"histogram": {str(k): v for k, v in
                                                   sorted(hist.counts.items())},
                                     "per_shard": [s["report"] for s in servers]},
                        "ps/staleness.json")
    run.client.log_dict(run.run_id, {str(s["report"]["shard"]): s["events"] for s in servers},
                        "ps/events.json")
    run.client.log_dict(run.run_id, [{k: r[k] for k in ("worker", "attempt", "start_step",
                                                         "steps", "seconds", "stamps",
                                                         "failovers", "pull_s", "push_s",
                                                         "bytes_out", "bytes_in")}
                                     for r in workers], "ps/workers.json")
    log.info("parameter-server job: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def _train(prepared: Any, task: WorkerTask, group: ServerGroup, plan: JobPlan, store: Any,
           cfg: JobConfig) -> tuple[list[dict[str, Any]], float]:
    """Run the workers' stage (partition r = worker r) while the cut collector commits
    checkpoints; return the workers' reports and the stage's wall time."""
    t0 = time.monotonic()
    # A checkpoint commit that failed raises CheckpointError when the collector exits (after
    # the stage, so a job never ends FINISHED without its cuts); a failed stage raises
    # TrainingFailed through it.
    with _collector(group, plan, store, cfg):
        try:
            table = prepared.frame.mapInArrow(functools.partial(run_worker_task, task),
                                              RESULT_DDL).toArrow()
        except Exception as exc:
            dead = group.dead()
            raise TrainingFailed(
                "parameter-server workers failed"
                + (f" (servers gone: {', '.join(dead)})" if dead else "")
                + f": {_last_line(exc)}") from exc
    workers = sorted((json.loads(r) for r in table.column("report").to_pylist()),
                     key=lambda r: r["worker"])
    return workers, time.monotonic() - t0


def _collector(group: ServerGroup, plan: Any, store: Any, cfg: JobConfig) -> Any:
    """The checkpoint thread while the workers run (a no-op without checkpoints)."""
    import contextlib

    if store is None:
        return contextlib.nullcontext()
    return CutCollector(group.cut_dir, plan, store, fingerprint(cfg))


def _finish(prepared: Any, cfg: JobConfig, run: Any, model: torch.nn.Module, total: int,
            store: Any) -> str | None:
    """The final model as the run's checkpoint (``api.final_state`` reads it) and, when
    ``tracking.log_model``, as its logged model."""
    if store is not None:
        store.save({"model": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   {"steps_done": total, "epoch": cfg.training.epochs, "step_in_epoch": 0,
                    "fingerprint": fingerprint(cfg)})
    if not cfg.tracking.log_model:
        return None
    example = np.asarray(prepared.example_features, dtype=np.float32)
    return run.log_model(model, example, prepared.classes, cfg.tracking.registered_model_name)
