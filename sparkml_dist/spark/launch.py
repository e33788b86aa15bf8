"""The driver's attempt loop around the barrier stage.

Spark does not retry a failed barrier result stage, so the driver does: it records the failure in
the run, waits, and relaunches; every rank then resumes from the latest complete checkpoint. A
deterministic user error stops after the first attempt.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import threading
import time
import uuid
from typing import Any, Callable

from sparkml_dist.comm.sealed_store import new_secret
from sparkml_dist.config import JobConfig
from sparkml_dist.errors import USER_ERROR_MARKER, TrainingFailed, UserCodeError
from sparkml_dist.spark.prepare import PreparedData, _spark_conf
from sparkml_dist.spark.rendezvous import open_board
from sparkml_dist.spark.task import RESULT_SCHEMA, TaskSpec, run_barrier_task
from sparkml_dist.tracking.redact import redact_uri
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
    """Rank, error and log tail of a failed barrier stage, parsed from Spark's exception (URI
    passwords in it redacted)."""
    text = redact_uri(str(exc))
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
        from sparkml_dist.spark.preflight import SHIP_HINT

        first = (f"{import_error.group(0)} while starting the task: the executors' Python lacks "
                 f"it. {SHIP_HINT}")
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


class JobDeadline:
    """``fault.deadline_s`` over all attempts: the barrier stage runs under a Spark job tag, and
    a timer cancels the tagged jobs once the deadline passes (``with deadline:`` around each
    launch). Classic Spark tags the driver thread's jobs (``SparkContext.addJobTag``, cancelled
    with task interruption); Spark Connect tags the session's operations
    (``SparkSession.addTag``/``interruptTag``)."""

    def __init__(self, spark: Any, seconds: float | None) -> None:
        self.spark = spark
        self.seconds = seconds
        self.ends = time.monotonic() + seconds if seconds is not None else math.inf
        self.tag = f"sparkml-dist-train-{uuid.uuid4().hex[:12]}"
        self.expired = False
        self._timer: threading.Timer | None = None
        try:
            self._classic = spark.sparkContext  # raises on Spark Connect
        except Exception:  # noqa: BLE001 - PySparkNotImplementedError and friends
            self._classic = None

    def remaining(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    def _expire(self) -> None:
        self.expired = True
        log.error("fault.deadline_s=%s passed: cancelling the training jobs", self.seconds)
        try:
            if self._classic is not None:
                self._classic.cancelJobsWithTag(self.tag)
            else:
                self.spark.interruptTag(self.tag)
        except Exception as exc:  # noqa: BLE001 - the launch fails either way
            log.warning("could not cancel the training jobs: %s", exc)

    def __enter__(self) -> JobDeadline:
        if self.seconds is None:
            return self
        if self.remaining() <= 0:
            self._expire()
            raise TrainingFailed(self._message())
        if self._classic is not None:
            self._classic.setInterruptOnCancel(True)
            self._classic.addJobTag(self.tag)
        else:
            self.spark.addTag(self.tag)
        self._timer = threading.Timer(self.remaining(), self._expire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            if self._classic is not None:
                self._classic.removeJobTag(self.tag)
            else:
                self.spark.removeTag(self.tag)

    def _message(self) -> str:
        return (f"training did not finish within fault.deadline_s={self.seconds:g} s; its Spark "
                "jobs were cancelled and the run keeps its last checkpoint (resume it with "
                "resume_run_id). Raise fault.deadline_s, or unset it.")

    def failure(self, attempt: int) -> dict[str, Any] | None:
        """The failure record of an attempt the deadline cancelled, else None."""
        if not self.expired:
            return None
        return {"attempt": attempt, "rank": None, "kind": "deadline", "error": self._message(),
                "detail": self._message(), "user_error": False, "detected_at": time.time()}


def run_attempts(prepared: PreparedData, cfg: JobConfig, run: JobRun,
                 before_relaunch: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Launch the barrier stage until it succeeds or ``fault.max_restarts`` is used up.

    ``before_relaunch`` runs before every relaunch (the pre-flight check, which waits for a lost
    executor's replacement to register).
    """
    first = run.attempts_so_far
    last = first + cfg.fault.max_restarts
    spark = prepared.frame.sparkSession
    deadline = JobDeadline(spark, cfg.fault.deadline_s)
    master = _spark_conf(spark, "spark.master") or ""
    for attempt in range(first, last + 1):
        plan = RankPlan(in_features=prepared.in_features, num_outputs=prepared.num_outputs,
                        train_shard_sizes=prepared.train_shard_sizes, layout=prepared.layout,
                        attempt=attempt, val_shard_sizes=prepared.val_shard_sizes)
        board = open_board(spark, cfg.backend.rendezvous, cfg.backend.rendezvous_timeout_s,
                           master)  # for this attempt only: closed when its stage ends
        spec = TaskSpec(config=cfg, plan=plan, run_id=run.run_id, tracking_uri=run.tracking_uri,
                        secret=new_secret(), board=board.address if board is not None else None)
        run.record_attempt(attempt)
        log.info("launching attempt %d: a barrier stage of %d ranks", attempt,
                 prepared.num_workers)
        try:
            with deadline, board or contextlib.nullcontext():
                rows = (prepared.feed_frame()
                        .mapInArrow(functools.partial(run_barrier_task, spec), RESULT_SCHEMA,
                                    barrier=True)
                        .collect())
        except Exception as exc:  # noqa: BLE001 - classified below
            # The job's secrets (a read option quoted by Spark's error) stay out of logs too.
            failure = run.redactor.value(deadline.failure(attempt)
                                         or describe_failure(exc, attempt))
            run.log_failure(attempt, failure)
            log.error("attempt %d failed on rank %s: %s", attempt, failure["rank"],
                      failure["error"])
            if failure["kind"] == "deadline":
                raise TrainingFailed(failure["error"]) from None
            if failure["user_error"]:
                raise UserCodeError(f"training stopped after attempt {attempt}: rank "
                                    f"{failure['rank']} hit an error in user code that a relaunch "
                                    f"cannot fix:\n{failure['detail']}") from None
            if attempt == last:
                raise TrainingFailed(
                    f"training failed on all {attempt - first + 1} attempts (fault.max_restarts="
                    f"{cfg.fault.max_restarts}); last failure on rank {failure['rank']}:\n"
                    f"{failure['detail']}") from None
            time.sleep(min(cfg.fault.backoff_s, deadline.remaining()))
            if before_relaunch is not None:
                before_relaunch()
            continue
        results = [r.asDict() for r in rows]
        for r in results:
            r["metrics"] = json.loads(r["metrics"])
        return sorted(results, key=lambda r: r["rank"])
    raise AssertionError("unreachable")
