"""Checks on the driver before a barrier stage is launched, so a job that cannot run fails at
once with the setting to change instead of waiting for slots that never come."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

from pyspark.sql import SparkSession

from sparkml_dist.config import BackendConfig, TrackingConfig
from sparkml_dist.errors import ClusterError
from sparkml_dist.tracking.redact import redact_uri

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


# ---------------------------------------------------------------------------------------------
# Where the run is tracked: executors must be able to write there.

_LOCAL_SCHEMES = ("", "file", "sqlite")
_REMOTE_NAMES = ("databricks", "databricks-uc", "uc")  # MLflow URIs that name a workspace
SHIP_HINT = ("Ship the driver's environment: `make dist` builds dist/sparkml_dist-env.tar.gz; "
             "submit with --archives dist/sparkml_dist-env.tar.gz#environment --conf "
             "spark.pyspark.python=./environment/bin/python (client deploy mode: also --conf "
             "spark.pyspark.driver.python=<the driver's python>). On Databricks install the "
             "sparkml_dist wheel as a cluster library. See README, 'Running on a cluster'.")


def _is_local_path(uri: str) -> bool:
    from urllib.parse import urlparse

    if uri.split(":")[0].lower() in _REMOTE_NAMES:
        return False
    scheme = urlparse(uri).scheme.lower()
    return scheme in _LOCAL_SCHEMES or len(scheme) == 1  # len 1: a Windows drive letter


def _master_is_local(master: str) -> bool:
    return master.startswith("local")  # local, local[N], local-cluster[...]: the driver's host


def local_store_problem(tracking_uri: str, master: str,
                        artifact_location: str | None = None) -> str | None:
    """Why executors of ``master`` cannot write to this tracking (or artifact) store, or None.

    A SQLite file, a ``file:`` URI or a plain path lives on the driver's disk; rank 0 writes
    metrics and checkpoints from an executor, which under a non-local master is another host.
    """
    if not master or _master_is_local(master):
        return None
    if _is_local_path(tracking_uri):
        what = f"the tracking store {redact_uri(tracking_uri)}"
    elif artifact_location and _is_local_path(artifact_location):
        what = (f"the experiment's artifact location {redact_uri(artifact_location)} (tracking "
                f"server {redact_uri(tracking_uri)} does not proxy artifacts)")
    else:
        return None
    return (f"{what} is a path on the driver's disk, but spark.master={master} runs the ranks "
            "on executors, and rank 0 writes metrics and checkpoints from there. Start a "
            "tracking server that proxies artifacts (mlflow server --host 0.0.0.0 --port 5000 "
            "--backend-store-uri sqlite:///mlflow.db --serve-artifacts) and point the job at it "
            "(export MLFLOW_TRACKING_URI=http://<server-host>:5000, or set "
            "tracking.tracking_uri); or, if this path is on storage every node mounts at the "
            "same path, set tracking.shared_storage=true.")


def check_tracking_store(spark: SparkSession, tracking_uri: str, experiment: str,
                         shared_storage: bool = False) -> None:
    """Fail before launch when executors could not write to the run's tracking store."""
    if shared_storage:
        return
    master = _conf(spark, "spark.master", "") or ""
    if not master or _master_is_local(master):
        return
    artifact_location = None
    if not _is_local_path(tracking_uri):
        try:
            from mlflow.tracking import MlflowClient

            exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
            artifact_location = exp.artifact_location if exp is not None else None
        except Exception as exc:  # noqa: BLE001 - the run's creation reports it just after
            log.debug("could not read experiment %r from %s: %s", experiment,
                      redact_uri(tracking_uri), redact_uri(str(exc)))
    problem = local_store_problem(tracking_uri, master, artifact_location)
    if problem:
        raise ClusterError(problem)


# ---------------------------------------------------------------------------------------------
# The executors' Python: can it import what the ranks import, at the driver's versions?

def compare_reports(driver: dict[str, dict], driver_python: str,
                    reports: list[dict]) -> list[str]:
    """One line per executor host (and Python) whose report differs from the driver's."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for rep in reports:
        key = (rep.get("host", "?"), rep.get("python", "?"))
        problems = grouped.setdefault(key, [])
        found = _report_problems(driver, driver_python, rep)
        problems.extend(p for p in found if p not in problems)
    return [f"executor on {host} (Python {py}): " + "; ".join(problems)
            for (host, py), problems in sorted(grouped.items()) if problems]


def _report_problems(driver: dict[str, dict], driver_python: str, rep: dict) -> list[str]:
    if rep.get("fatal"):
        return [f"the probe failed: {rep['fatal']}"]
    problems = []
    version = rep.get("python_version", "?")
    if version.split(".")[:2] != driver_python.split(".")[:2]:
        problems.append(f"Python {version} (driver: {driver_python})")
    for name, want in driver.items():
        if want.get("error"):
            continue  # the driver lacks it too; its own import reports that
        got = rep.get("modules", {}).get(name, {})
        if got.get("error") or not got:
            problems.append(f"{name} missing ({got.get('error', 'not checked')})")
        elif got.get("version") != want.get("version"):
            problems.append(f"{name} {got.get('version')} (driver: {want.get('version')})")
        elif want.get("code") and got.get("code") != want.get("code"):
            problems.append(f"{name} {got.get('version')} with other code (code hash "
                            f"{got.get('code')}, driver: {want.get('code')}): the executors' "
                            "copy was built from another checkout; rebuild it")
    if rep.get("tracking_error"):  # the executor quotes the URI as given: redact it here
        problems.append(redact_uri(rep["tracking_error"]))
    return problems


def check_executors(spark: SparkSession, num_workers: int, tracking_uri: str,
                    horovod: bool = False, timeout_s: float = 180.0) -> None:
    """Before the barrier stage: one probe task per task slot (so every executor runs one)
    imports torch, pyarrow, mlflow and sparkml_dist (and Horovod when asked for), compares their
    versions with the driver's and checks it can reach the tracking server. Any difference fails
    at once, naming the host, the package and how to ship the environment.

    The probe is a barrier stage, which Spark never retries, bounded by ``timeout_s``. It is
    skipped under a local master, whose Python workers run on the driver's host.
    """
    from sparkml_dist.spark import probe

    master = _conf(spark, "spark.master", "") or ""
    if not master or _master_is_local(master):
        return
    modules = probe.REQUIRED + ((probe.HOROVOD,) if horovod else ())
    driver = probe.module_versions(modules)
    driver_python = "%d.%d.%d" % sys.version_info[:3]
    slots = available_slots(spark) or num_workers
    tasks = max(num_workers, min(slots, 1024))
    log.info("pre-flight: probing the executors' Python with %d tasks (at most %.0f s)", tasks,
             timeout_s)
    started = time.monotonic()
    reports = _run_probe(spark, tasks, modules, tracking_uri, timeout_s)
    problems = compare_reports(driver, driver_python, reports)
    if problems:
        raise ClusterError(f"pre-flight on executors ({time.monotonic() - started:.1f} s): their "
                           "Python cannot run the ranks as the driver would:\n  "
                           + "\n  ".join(problems) + "\n" + SHIP_HINT)
    hosts = sorted({r.get("host", "?") for r in reports})
    log.info("pre-flight: %d probe tasks on %s match the driver's packages (%.1f s)", tasks,
             ", ".join(hosts), time.monotonic() - started)


def _run_probe(spark: SparkSession, tasks: int, modules: tuple[str, ...], tracking_uri: str,
               timeout_s: float) -> list[dict]:
    import functools
    import json
    import threading
    import uuid

    from sparkml_dist.spark import probe

    probe.register_by_value()
    tag = f"sparkml_dist-preflight-{uuid.uuid4().hex[:12]}"
    box: dict[str, Any] = {}
    classic = _classic_context(spark)

    def collect() -> None:
        try:
            if classic is not None:
                classic.setJobGroup(tag, "sparkml_dist pre-flight", interruptOnCancel=True)
                rows = (classic.parallelize(range(tasks), tasks).barrier()
                        .mapPartitions(functools.partial(probe.probe_partition, modules,
                                                         tracking_uri)).collect())
            else:
                spark.addTag(tag)
                rows = [r[0] for r in spark.range(tasks, numPartitions=tasks).mapInArrow(
                    functools.partial(probe.probe_arrow, modules, tracking_uri),
                    "report string", barrier=True).collect()]
            box["rows"] = rows
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=collect, name="sparkml_dist-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        _cancel(spark, classic, tag)
        thread.join(10.0)
        raise ClusterError(f"pre-flight on executors: {tasks} probe tasks did not finish within "
                           f"{timeout_s:.0f} s (executors not starting their Python, or too few "
                           "free task slots). Check the executors' logs.\n" + SHIP_HINT)
    if "error" in box:
        raise ClusterError(_probe_failure(spark, classic, box["error"])) from None
    return [json.loads(r) for r in box["rows"]]


def _classic_context(spark: SparkSession) -> Any:
    try:
        return spark.sparkContext  # raises on Spark Connect
    except Exception:  # noqa: BLE001 - PySparkNotImplementedError and friends
        return None


def _cancel(spark: SparkSession, classic: Any, tag: str) -> None:
    try:
        if classic is not None:
            classic.cancelJobGroup(tag)
        else:
            spark.interruptTag(tag)
    except Exception as exc:  # noqa: BLE001 - best effort; the caller raises anyway
        log.warning("could not cancel the pre-flight job %s: %s", tag, exc)


_PROBE_ERRORS = (r"Cannot run program [^\n]*", r"Python in worker has different version[^\n]*",
                 r"(?:ModuleNotFoundError|ImportError): [^\n]*", r"No such file or directory[^\n]*")


def _probe_failure(spark: SparkSession, classic: Any, exc: BaseException) -> str:
    text = redact_uri(str(exc))
    first = next((m.group(0) for p in _PROBE_ERRORS if (m := re.search(p, text))),
                 text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    python = (getattr(classic, "pythonExec", None) if classic is not None else None) or \
        _conf(spark, "spark.pyspark.python") or "python3"
    hint = ""
    if "environment/" in python or "environment/" in first:
        hint = (f" {python} exists only where the packed environment was unpacked: submit with "
                "--archives <env>.tar.gz#environment.")
    return (f"pre-flight on executors: the executors could not start their Python ({python}) "
            f"to run the probe: {first[:500]}.{hint}\n{SHIP_HINT}")


def check_shipping(spark: SparkSession, num_workers: int, backend: BackendConfig,
                   tracking: TrackingConfig) -> None:
    """The checks that a job's environment and tracking store reach its executors: the store
    is not a path on the driver's disk (:func:`check_tracking_store`), and the executors' Python
    matches the driver's (:func:`check_executors`)."""
    from sparkml_dist.tracking.mlflow_store import default_tracking_uri

    uri = default_tracking_uri(tracking.tracking_uri)
    check_tracking_store(spark, uri, tracking.experiment,
                         tracking.shared_storage)
    check_executors(spark, num_workers, uri, horovod=backend.name == "horovod")
