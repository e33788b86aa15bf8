"""Checks on the driver before a barrier stage is launched, so a job that cannot run fails at
once with the setting to change instead of waiting for slots that never come."""

from __future__ import annotations

import logging
import re
import time

from pyspark.sql import SparkSession

from sparkml_dist.config import BackendConfig
from sparkml_dist.errors import ClusterError

log = logging.getLogger(__name__)


def _conf(spark: SparkSession, key: str, default: str | None = None) -> str | None:
    try:
        return spark.conf.get(key, default)
    except Exception:  # noqa: BLE001 - an unset key on Spark Connect
        return default


def local_slots(master: str, task_cpus: int) -> int | None:
    """Task slots of a ``local[...]`` master, or None for other masters."""
    import os

    if master == "local":
        return 1 // task_cpus
    m = re.fullmatch(r"local\[(\*|\d+)(?:,\s*\d+)?\]", master.strip())
    if not m:
        return None
    cores = (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))
    return cores // task_cpus


def available_slots(spark: SparkSession) -> int | None:
    """Concurrent task slots Spark can give a barrier stage now; None when it cannot be known."""
    task_cpus = int(_conf(spark, "spark.task.cpus", "1") or 1)
    master = _conf(spark, "spark.master", "") or ""
    slots = local_slots(master, task_cpus)
    if slots is not None:
        return slots
    try:
        jsc = spark.sparkContext._jsc.sc()  # classic session only
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        return int(jsc.maxNumConcurrentTasks(profile))
    except Exception:  # noqa: BLE001 - Spark Connect: no JVM handle on the client
        return configured_slots(spark, task_cpus)


def configured_slots(spark: SparkSession, task_cpus: int) -> int | None:
    """Slots of a fixed-size cluster from its settings (``spark.executor.instances`` x
    ``spark.executor.cores`` // ``spark.task.cpus``), which a Spark Connect client can read; None
    unless both are set."""
    instances, cores = (_conf(spark, "spark.executor.instances"),
                        _conf(spark, "spark.executor.cores"))
    if not instances or not cores:
        return None
    return int(instances) * (int(cores) // task_cpus)


def check_cluster(spark: SparkSession, num_workers: int, backend: BackendConfig,
                  wait_s: float = 30.0) -> None:
    """Fail fast when the cluster cannot run ``num_workers`` ranks at once."""
    if (_conf(spark, "spark.dynamicAllocation.enabled", "false") or "").lower() == "true":
        raise ClusterError("spark.dynamicAllocation.enabled=true: barrier stages cannot run with "
                           "dynamic allocation. Set spark.dynamicAllocation.enabled=false and a "
                           "fixed spark.executor.instances.")
    if backend.device == "cuda":
        amount = _conf(spark, "spark.task.resource.gpu.amount")
        if not amount or float(amount) <= 0:
            raise ClusterError("backend.device=cuda needs one GPU per task: set "
                               "spark.task.resource.gpu.amount=1 and "
                               "spark.executor.resource.gpu.amount (and a discovery script).")
        if float(amount) != 1.0:
            raise ClusterError(f"spark.task.resource.gpu.amount={amount}: each rank needs "
                               "exactly one GPU. Set it to 1.")
    deadline = time.monotonic() + wait_s
    while True:
        slots = available_slots(spark)
        if slots is None:
            log.warning("cannot count task slots on this session (Spark Connect to a cluster "
                        "without spark.executor.instances/cores set); relying on Spark's own "
                        "barrier check for %d slots, which retries for up to spark.scheduler."
                        "barrier.maxConcurrentTasksCheck.maxFailures x .interval (10 min by "
                        "default) before failing", num_workers)
            return
        is_local = (_conf(spark, "spark.master", "") or "").startswith("local")
        if slots >= num_workers or is_local or time.monotonic() >= deadline:
            break
        time.sleep(1.0)  # executors of a fresh cluster may still be registering
    if slots < num_workers:
        master = _conf(spark, "spark.master", "?")
        raise ClusterError(
            f"training.num_workers={num_workers} needs {num_workers} task slots at once, but the "
            f"cluster has {slots} (spark.master={master}, spark.task.cpus="
            f"{_conf(spark, 'spark.task.cpus', '1')}). Lower training.num_workers, or add "
            "executors/cores (spark.executor.instances, spark.executor.cores; local[N] for "
            "local mode).")
    if backend.device == "cuda":
        log.info("GPU request: one GPU per task for %d ranks", num_workers)
