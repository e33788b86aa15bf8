"""The public entry point: :func:`fit`."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparkml_dist.config import JobConfig, load_config
from sparkml_dist.driver_checks import check_encryption, check_environment, check_prepared
from sparkml_dist.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns."""

    run_id: str
    """The job's MLflow run."""
    model_uri: str | None
    """URI of the logged model (``mlflow.pyfunc.load_model`` can load it), if one was logged."""
    metrics: dict[str, float]
    """Final metrics reported by rank 0 (train loss, validation loss/accuracy or RMSE...)."""
    attempts: int
    """Launch attempts this call made (1 when nothing failed)."""
    tracking_uri: str
    """Where the run lives."""
    experiment_id: str
    ranks: tuple[dict[str, Any], ...] = ()
    """Per-rank reports: rank, attempt, steps_done, resumed_from, metrics, executor."""


def _resolve_config(config: JobConfig | str | Path | None, overrides: dict[str, Any]) -> JobConfig:
    if config is None:
        cfg = JobConfig()
    elif isinstance(config, JobConfig):
        cfg = config
    elif isinstance(config, (str, Path)):
        cfg = load_config(config)
    else:
        raise ConfigError(f"config must be a JobConfig or a YAML path; got {type(config).__name__}.")
    return cfg.replace(**overrides) if overrides else cfg


def fit(data: Any = None, config: JobConfig | str | Path | None = None, *, spark: Any = None,
        resume_run_id: str | None = None, force_resume: bool = False,
        **overrides: Any) -> FitResult:
    """Train ``config.model`` on ``data`` across ``training.num_workers`` Spark barrier tasks.

    Args:
        data: a Spark DataFrame (classic or Spark Connect), a table name or a file path; None
            reads ``config.data.source``.
        config: a :class:`JobConfig`, a YAML path, or None for defaults.
        spark: the SparkSession (default: the DataFrame's, or the active one).
        resume_run_id: continue this MLflow run from its latest checkpoint (a job whose driver
            died). A run that is FINISHED, or RUNNING with a live driver, is refused.
        force_resume: resume even though the run's driver looks alive (its heartbeat tag is
            fresh), e.g. right after that driver was killed.
        **overrides: dotted config overrides, e.g. ``**{"training.epochs": 3}``.

    Returns:
        A :class:`FitResult` with the run id, model URI and final metrics.
    """
    from pyspark.sql import DataFrame, SparkSession

    from sparkml_dist.spark.launch import run_attempts
    from sparkml_dist.spark.preflight import check_cluster, check_shipping
    from sparkml_dist.spark.prepare import prepare, read_source
    from sparkml_dist.strategies import check_before_launch, data_layout, strategy_class
    from sparkml_dist.tracking.progress import ProgressReporter
    from sparkml_dist.tracking.run import JobRun

    cfg = _resolve_config(config, overrides)
    check_before_launch(cfg)  # strategy/backend pairing: fails before any data is read
    if cfg.tracking.log_model and not cfg.checkpoint.enabled:
        raise ConfigError("tracking.log_model=true needs checkpoint.enabled=true (the model is "
                          "logged from the final checkpoint).")
    if isinstance(data, DataFrame):
        df = data
        spark = spark or df.sparkSession
    else:
        spark = spark or SparkSession.getActiveSession()
        if spark is None:
            raise ConfigError("no active SparkSession: create one or pass spark=...")
        if isinstance(data, str):
            cfg = cfg.replace(**{"data.source": data})
        df = read_source(spark, cfg.data)
    if cfg.strategy.kind == "federated":
        return _fit_federated(spark, df, cfg, resume_run_id, force_resume)
    if cfg.strategy.kind == "parameter_server":
        return _fit_parameter_server(spark, df, cfg, resume_run_id, force_resume)
    tc = cfg.training
    check_environment(cfg, _master(spark))
    check_encryption(cfg, lambda key: _conf(spark, key))
    check_cluster(spark, tc.num_workers, cfg.backend)
    check_shipping(spark, tc.num_workers, cfg.backend, cfg.tracking)
    t_prepare = time.perf_counter()
    prepared = prepare(spark, df, cfg.data, data_layout(cfg), tc.seed)
    preprocessing = None
    try:
        check_prepared(cfg, prepared.train_shard_sizes, prepared.classes)
        if cfg.data.scale != "none" or cfg.data.on_invalid == "fill" or cfg.data.categorical_cols:
            prepared, preprocessing = _preprocess(prepared, cfg)
        prepare_s = time.perf_counter() - t_prepare
        run = JobRun(cfg, resume_run_id, force_resume=force_resume)
        for path, text in (preprocessing.artifacts() if preprocessing else {}).items():
            run.client.log_text(run.run_id, text, path)
        run.start_heartbeat()
    except BaseException:
        prepared.release()
        raise
    first_attempt = run.attempts_so_far
    # From here on every way out sets the run's status: FAILED, KILLED (Ctrl-C) or FINISHED.
    try:
        try:
            app_id = spark.conf.get("spark.app.id")
        except Exception:  # noqa: BLE001 - not exposed on every Connect server
            app_id = "unknown"
        tags = {"sparkml_dist.backend": cfg.backend.name,
                "sparkml_dist.world_size": tc.num_workers,
                "sparkml_dist.device": cfg.backend.device, "spark.app_id": app_id,
                **strategy_class(cfg.strategy.kind).run_tags(cfg)}
        if cfg.backend.name == "horovod":
            from sparkml_dist.comm.horovod import run_tags as horovod_run_tags

            tags.update(horovod_run_tags(cfg.backend))
        run.set_tags(tags)
        if resume_run_id:
            check_resume(run, cfg, prepared.layout)
        run.log_params({"data.rows_train": sum(prepared.train_shard_sizes),
                        "data.rows_val": sum(prepared.val_shard_sizes),
                        "data.rows_dropped": prepared.dropped_rows,
                        "data.in_features": prepared.in_features,
                        "data.classes": list(prepared.classes)[:200]})
        threading.Thread(target=_warm_finish_imports, name="sparkml_dist-warm-imports",
                         daemon=True).start()
        with ProgressReporter(run.client, run.run_id, cfg.tracking.progress_interval_s,
                              cfg.tracking.progress):
            results = run_attempts(
                prepared, cfg, run, lambda: check_cluster(spark, tc.num_workers, cfg.backend, 60.0))
        t_finish = time.perf_counter()
        model_uri = None
        if cfg.tracking.log_model:
            model_uri = _log_final_model(cfg, prepared, run, preprocessing,
                                         steps_done=results[0]["steps_done"])
        run.log_training_curves()
        _log_phase_times(run, prepared, prepare_s, time.perf_counter() - t_finish)
    except BaseException as exc:
        run.finish_after(exc)
        raise
    finally:
        prepared.release()
    run.finish()
    metrics = results[0]["metrics"]
    log.info("run %s finished: %s", run.run_id, metrics)
    return FitResult(run_id=run.run_id, model_uri=model_uri, metrics=metrics,
                     attempts=results[0]["attempt"] - first_attempt + 1,
                     tracking_uri=run.tracking_uri, experiment_id=run.experiment_id,
                     ranks=tuple(results))


def _fit_federated(spark: Any, df: Any, cfg: JobConfig, resume_run_id: str | None,
                   force_resume: bool = False) -> FitResult:
    """``strategy.kind: federated``: rounds run by the driver as ordinary Spark stages
    (:mod:`sparkml_dist.strategies.federated`), in one MLflow run like every job."""
    from sparkml_dist.strategies.federated.driver import fit_federated

    return _fit_on_driver(fit_federated, spark, df, cfg, resume_run_id, force_resume)


def _fit_parameter_server(spark: Any, df: Any, cfg: JobConfig, resume_run_id: str | None,
                          force_resume: bool = False) -> FitResult:
    """``strategy.kind: parameter_server``: servers started by the driver, workers as one
    ordinary Spark stage (:mod:`sparkml_dist.strategies.parameter_server`), one MLflow run."""
    from sparkml_dist.strategies.parameter_server.driver import (
        check_before_run, fit_parameter_server)

    check_before_run(spark, cfg, lambda key: _conf(spark, key))
    return _fit_on_driver(fit_parameter_server, spark, df, cfg, resume_run_id, force_resume)


def _fit_on_driver(fit_fn: Any, spark: Any, df: Any, cfg: JobConfig, resume_run_id: str | None,
                   force_resume: bool) -> FitResult:
    """A strategy whose driver runs the job itself: ``fit_fn(spark, df, cfg, run)`` inside one
    MLflow run, which it leaves FINISHED, or FAILED/KILLED with the error."""
    from sparkml_dist.tracking.run import JobRun

    run = JobRun(cfg, resume_run_id, force_resume=force_resume)
    run.start_heartbeat()
    try:
        out = fit_fn(spark, df, cfg, run)
        run.log_training_curves()
    except BaseException as exc:
        run.finish_after(exc)
        raise
    run.finish()
    return FitResult(run_id=run.run_id, model_uri=out.get("model_uri"), metrics=out["metrics"],
                     attempts=1, tracking_uri=run.tracking_uri, experiment_id=run.experiment_id,
                     ranks=tuple(out.get("ranks", ())))


def _conf(spark: Any, key: str) -> str:
    """A Spark setting of the session, or "" where it is unset or not exposed (Connect)."""
    try:
        return spark.conf.get(key, "") or ""
    except Exception:  # noqa: BLE001 - Connect may refuse the key
        return ""


def _master(spark: Any) -> str:
    """The session's master URL, or "" where it is not exposed (some Connect servers)."""
    return _conf(spark, "spark.master")


def check_resume(run: Any, cfg: JobConfig, layout: Any) -> None:
    """Before relaunching a run: its newest checkpoint must have been written by the same
    strategy settings, world size and data layout, or the resume fails here, on the driver."""
    from sparkml_dist.strategies import job_fingerprint
    from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore
    from sparkml_dist.training.checkpoint import check_fingerprint

    store = MlflowCheckpointStore(run.tracking_uri, run.run_id)
    names = store.complete_names()
    if not names:
        return
    check_fingerprint(names[0], store.read_meta(names[0]).fingerprint,
                      job_fingerprint(cfg, layout))


def final_state(run_id: str, tracking_uri: str, steps_done: int | None = None
                ) -> dict[str, Any]:
    """The model ``state_dict`` of a run's latest complete checkpoint.

    ``steps_done``: the step count the ranks reported at the end, whose checkpoint is the last;
    it is read by name, without listing the run's artifacts. Where it does not load, the newest
    loadable checkpoint is used, as without it."""
    from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore
    from sparkml_dist.training.checkpoint import SHARED_PART, dir_name, load_part

    store = MlflowCheckpointStore(tracking_uri, run_id)
    if steps_done is not None:
        name = dir_name(steps_done)
        try:
            return load_part(store, name, store.read_meta(name), SHARED_PART)["model"]
        except Exception as exc:  # noqa: BLE001 - the listing below finds what there is
            log.info("checkpoint %s of the last step did not load (%s: %s); using the newest "
                     "loadable one", name, type(exc).__name__, exc)
    loaded = store.load_latest()
    if loaded is None:
        raise ConfigError(f"run {run_id} has no complete checkpoint.")
    return loaded[0]["model"]


def best_state(run_id: str, tracking_uri: str) -> dict[str, Any]:
    """The model ``state_dict`` of a run's best epoch (``training.early_stopping.keep_best``)."""
    return _best_checkpoint(run_id, tracking_uri)[0]


def _best_checkpoint(run_id: str, tracking_uri: str) -> tuple[dict[str, Any], int]:
    """The best epoch's model ``state_dict`` and the step it was saved at."""
    from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore
    from sparkml_dist.training.checkpoint import BEST_NAME, SHARED_PART, load_part

    store = MlflowCheckpointStore(tracking_uri, run_id)
    try:
        meta = store.read_meta(BEST_NAME)
    except Exception as exc:  # noqa: BLE001 - reported with what to do
        raise ConfigError(f"run {run_id} has no best-epoch model ({type(exc).__name__}: {exc}); "
                          "it is written when training.early_stopping.keep_best is set and an "
                          "epoch's validation improves.") from exc
    log.info("logging the model of the best epoch (%s at epoch %s)",
             meta.early_stopping.get("best"), meta.early_stopping.get("best_epoch"))
    return load_part(store, BEST_NAME, meta, SHARED_PART)["model"], meta.steps_done


def _preprocess(prepared: Any, cfg: JobConfig) -> tuple[Any, Any]:
    """``data.categorical_cols`` (one-hot), ``data.on_invalid=fill``, then ``data.scale``: each
    fitted on the training split and applied to the prepared rows (Spark)."""
    from sparkml_dist.preprocessing import Preprocessing
    from sparkml_dist.spark.feature_scaling import fill_prepared, fit_fill, fit_one_hot, \
        fit_scaling, one_hot_prepared, scale_prepared

    fill = scaling = one_hot = None
    if cfg.data.categorical_cols:
        one_hot = fit_one_hot(prepared, cfg.data.feature_cols)
        prepared = one_hot_prepared(prepared, one_hot)
    if cfg.data.on_invalid == "fill":
        fill = fit_fill(prepared, cfg.data.fill)
        prepared = fill_prepared(prepared, fill)
    if cfg.data.scale != "none":
        scaling = fit_scaling(prepared, cfg.data.scale)
        prepared = scale_prepared(prepared, scaling)
    return prepared, Preprocessing(fill=fill, scaling=scaling, one_hot=one_hot)


def _warm_finish_imports() -> None:
    """Import what the finish needs and fit has not loaded yet (matplotlib, for the training
    curves: about 0.25 s) while the driver only waits on the barrier stage, so the finish after
    the last step does not pay for it."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # noqa: BLE001 - the finish imports it again and reports any error
        log.debug("matplotlib did not import ahead of the finish", exc_info=True)


def _log_final_model(cfg: JobConfig, prepared: Any, run: Any, preprocessing: Any = None, *,
                     steps_done: int | None = None) -> str:
    from sparkml_dist.models import build_model

    model = build_model(cfg.model.factory, prepared.in_features, prepared.num_outputs,
                        cfg.model.kwargs)
    es = cfg.training.early_stopping
    step = steps_done or 0
    if es is not None and es.keep_best:
        state, step = _best_checkpoint(run.run_id, run.tracking_uri)
        model.load_state_dict(state)
    else:
        model.load_state_dict(final_state(run.run_id, run.tracking_uri, steps_done))
    # Rows collected by preparation's first pass: nothing here reads the data again.
    example = np.asarray(prepared.example_features, dtype=np.float32)
    metadata = None
    if preprocessing is not None:  # the logged model scores raw rows
        model, example = preprocessing.wrap(model), preprocessing.example(example)
        metadata = preprocessing.model_metadata()
    return run.log_model(model, example, prepared.classes, cfg.tracking.registered_model_name,
                         metadata, raw_columns=preprocessing.one_hot if preprocessing else None,
                         step=step)


def _log_phase_times(run: Any, prepared: Any, prepare_s: float, finish_s: float) -> None:
    """Driver-side phase times as run metrics: ``time/prepare_s`` (read, validate, split, shard
    and persist, before launch; with its parts ``time/prepare_assemble_s`` and
    ``time/prepare_shard_s``) and ``time/finish_s`` (after the barrier stage returned: model
    logging and plots)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {"time/prepare_s": prepare_s, "time/finish_s": finish_s,
              **{f"time/prepare_{k}": v for k, v in prepared.timings.items()}}
    run.client.log_batch(run.run_id, metrics=[Metric(k, float(v), now, 0)
                                              for k, v in values.items()])
