"""The driver's attempt loop around the barrier stage.

Spark does not retry a failed barrier result stage, so the driver does: it records the failure in
the run, waits, and relaunches; every rank then resumes from the latest complete checkpoint. A
deterministic user error stops after the first attempt.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from typing import Any, Callable

from sparkml_dist.comm.sealed_store import new_secret
from sparkml_dist.config import JobConfig
from sparkml_dist.errors import USER_ERROR_MARKER, TrainingFailed, UserCodeError
from sparkml_dist.spark.prepare import PreparedData
from sparkml_dist.spark.task import RESULT_SCHEMA, TaskSpec, run_barrier_task
from sparkml_dist.tracking.run import JobRun
from sparkml_dist.training.loop import RankPlan

log = logging.getLogger(__name__)

# A rank died or its executor was lost; the rank Spark names may be a survivor whose collective
# broke because its peer vanished.
_LOST_PATTERN = (r"Python worker exited unexpectedly|Connection reset by peer|Connection closed by "
                 r"peer|ExecutorLostFailure|Executor heartbeat timed out|Broken pipe")
_RANK_PATTERNS = (r"sparkml_dist rank (\d+) attempt", r"ResultTask\(\d+, (\d+)\)",
                  r"Lost task (\d+)\.\d+ in stage")


def describe_failure(exc: BaseException, attempt: int) -> dict[str, Any]:
    """Rank, error and log tail of a failed barrier stage, parsed from Spark's exception."""
    text = str(exc)
    rank = None
    for pattern in _RANK_PATTERNS:
        m = re.search(pattern, text)
        if m:
            rank = int(m.group(1))
            break
    ours = re.search(r"((?:\[sparkml_dist:user-error\] )?sparkml_dist rank \d+ attempt \d+ "
                     r"failed: .*?)(?:\n\tat |\Z)", text, re.S)
    detail = ours.group(1) if ours else text
    first = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
    if not ours:
        crash = re.search(r"(Python worker exited unexpectedly[^\n]*|"
                          r"Could not recover from a failed barrier ResultStage[^\n]*)", text)
        first = crash.group(1) if crash else first
    # A task that cannot even unpickle its function (module missing on executors) fails the
    # same way on every attempt.
    import_error = not ours and re.search(r"(ModuleNotFoundError|ImportError): [^\n]*", text)
    if import_error:
        first = (f"{import_error.group(0)} while starting the task: install the package on every "
                 "executor or ship it with spark-submit --py-files")
    # Spark's own check that the cluster has enough slots for the barrier stage: a relaunch
    # would wait just as long again.
    no_slots = re.search(r"Barrier execution mode does not allow run a barrier stage that "
                         r"requires more slots[^\n]*", text)
    if no_slots:
        first = (f"{no_slots.group(0)}: the cluster has fewer task slots than "
                 "training.num_workers; lower it or add executors/cores")
    user_error = USER_ERROR_MARKER in text or bool(import_error) or bool(no_slots)
    lost = re.search(_LOST_PATTERN, text)
    kind = "user_error" if user_error else "worker_lost" if lost else "error"
    return {"attempt": attempt, "rank": rank, "kind": kind, "error": first[:2000],
            "detail": detail[-8000:], "user_error": user_error, "detected_at": time.time()}


def run_attempts(prepared: PreparedData, cfg: JobConfig, run: JobRun,
                 before_relaunch: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Launch the barrier stage until it succeeds or ``fault.max_restarts`` is used up.

    ``before_relaunch`` runs before every relaunch (the pre-flight check, which waits for a lost
    executor's replacement to register).
    """
    first = run.attempts_so_far
    last = first + cfg.fault.max_restarts
    for attempt in range(first, last + 1):
        plan = RankPlan(in_features=prepared.in_features, num_outputs=prepared.num_outputs,
                        train_shard_sizes=prepared.train_shard_sizes, layout=prepared.layout,
                        attempt=attempt)
        spec = TaskSpec(config=cfg, plan=plan, run_id=run.run_id, tracking_uri=run.tracking_uri,
                        secret=new_secret())
        run.record_attempt(attempt)
        log.info("launching attempt %d: a barrier stage of %d ranks", attempt,
                 prepared.num_workers)
        try:
            rows = (prepared.frame
                    .mapInArrow(functools.partial(run_barrier_task, spec), RESULT_SCHEMA,
                                barrier=True)
                    .collect())
        except Exception as exc:  # noqa: BLE001 - classified below
            failure = describe_failure(exc, attempt)
            run.log_failure(attempt, failure)
            log.error("attempt %d failed on rank %s: %s", attempt, failure["rank"],
                      failure["error"])
            if failure["user_error"]:
                raise UserCodeError(f"training stopped after attempt {attempt}: rank "
                                    f"{failure['rank']} hit an error in user code that a relaunch "
                                    f"cannot fix:\n{failure['detail']}") from None
            if attempt == last:
                raise TrainingFailed(
                    f"training failed on all {attempt - first + 1} attempts (fault.max_restarts="
                    f"{cfg.fault.max_restarts}); last failure on rank {failure['rank']}:\n"
                    f"{failure['detail']}") from None
            time.sleep(cfg.fault.backoff_s)
            if before_relaunch is not None:
                before_relaunch()
            continue
        results = [r.asDict() for r in rows]
        for r in results:
            r["metrics"] = json.loads(r["metrics"])
        return sorted(results, key=lambda r: r["rank"])
    raise AssertionError("unreachable")
