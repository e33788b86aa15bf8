"""MLflow-backed metric sink and checkpoint store, used by rank 0 inside a Spark task.

Both talk to the job's one run through ``MlflowClient`` with an explicit run id, so no rank ever
starts or ends a run of its own.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from sparkml_dist.training.checkpoint import (
    DEFAULT_UPLOAD_TIMEOUT_S, META_FILE, SHARED_PART, STALE_INCOMPLETE_S, CheckpointMeta, dir_name,
    latest_loadable, prune_choice, store_part)
from sparkml_dist.waits import join_within

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


METRICS_INTERVAL_S = 1.0
"""How often rank 0's metrics reach the run: the sink coalesces the windows reported in between
into one ``log_batch`` call, because each call costs milliseconds of the rank's CPU (and its GIL)
against a SQLite or remote store, which a call every ``log_every_steps`` steps would take from
training."""
_MAX_METRICS_PER_CALL = 1000  # MLflow's limit on metrics in one log_batch request


class MlflowSink:
    """Writes metrics into the run from a background thread, so a slow tracking store never
    stalls a training step. Reports arriving within ``interval_s`` of the last write go out
    together in one ``log_batch`` call; each metric keeps the timestamp and step of its report.
    ``flush()`` writes what is queued now and waits for it."""

    def __init__(self, tracking_uri: str, run_id: str,
                 interval_s: float = METRICS_INTERVAL_S) -> None:
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.interval_s = interval_s
        self._queue: queue.Queue[list[Metric]] = queue.Queue()
        self._error: BaseException | None = None
        self._now = threading.Event()  # set by flush(): write without waiting out the interval
        self._last_write = float("-inf")
        self._thread = threading.Thread(target=self._drain, name="sparkml_dist-metrics",
                                        daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            reports = [self._queue.get()]
            wait = self._last_write + self.interval_s - time.monotonic()
            if wait > 0:
                self._now.wait(wait)
            self._now.clear()
            while True:
                try:
                    reports.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            metrics = [m for report in reports for m in report]
            try:
                if self._error is None:  # after a failed write, reports are only acknowledged
                    for i in range(0, len(metrics), _MAX_METRICS_PER_CALL):
                        self.client.log_batch(self.run_id,
                                              metrics=metrics[i:i + _MAX_METRICS_PER_CALL])
            except BaseException as exc:  # noqa: BLE001 - surfaced by the next call
                self._error = exc
            finally:
                self._last_write = time.monotonic()
                for _ in reports:
                    self._queue.task_done()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._error is not None:
            raise RuntimeError(f"logging metrics to MLflow failed: {self._error}") from self._error
        now = int(time.time() * 1000)
        self._queue.put([Metric(key=k, value=float(v), timestamp=now, step=step)
                         for k, v in metrics.items()])

    def flush(self, timeout_s: float = 600.0) -> None:
        """Write what is queued now and wait for it, at most ``timeout_s`` (a TimeoutError
        past that: the tracking store does not answer)."""
        self._now.set()
        if join_within(self._queue, timeout_s):
            raise TimeoutError(f"rank 0's metrics were not stored in MLflow within "
                               f"{timeout_s:g} s; the tracking store does not answer")
        if self._error is not None:
            raise RuntimeError(f"logging metrics to MLflow failed: {self._error}") from self._error


class MlflowCheckpointStore:
    """Checkpoints as run artifacts under ``checkpoints/ckpt-<steps>/`` (see
    :mod:`sparkml_dist.training.checkpoint` for the layout and the commit protocol).

    Artifact stores keep no modification times, so an uncommitted directory's age is counted
    from when this store first listed it: pruning deletes it once it has stayed uncommitted for
    ``stale_s`` (before that it may be another writer's upload in progress).
    ``upload_timeout_s``: how long the rank loop waits for a background upload to this store.
    """

    def __init__(self, tracking_uri: str, run_id: str, keep_last: int = 2, *,
                 stale_s: float = STALE_INCOMPLETE_S,
                 upload_timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S) -> None:
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.keep_last = keep_last
        self.stale_s = stale_s
        self.upload_timeout_s = upload_timeout_s
        self._first_seen: dict[str, float] = {}  # uncommitted dir -> time.monotonic() first listed
        # The tracking URI must be passed on: an ``mlflow-artifacts:`` URI (a tracking server that
        # serves artifacts) resolves against it, not against the process-global default.
        self._repo = get_artifact_repository(self.client.get_run(run_id).info.artifact_uri,
                                             tracking_uri=tracking_uri)

    def _dirs(self) -> list[str]:
        names = [Path(f.path).name for f in self.client.list_artifacts(self.run_id, CHECKPOINT_DIR)
                 if f.is_dir]
        return sorted((n for n in names if n.startswith("ckpt-")), reverse=True)

    def _has_meta(self, name: str) -> bool:
        files = self.client.list_artifacts(self.run_id, f"{CHECKPOINT_DIR}/{name}")
        return any(Path(f.path).name == META_FILE for f in files)

    def _put(self, name: str, filename: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, filename)
            path.write_bytes(data)
            self._repo.log_artifact(str(path), f"{CHECKPOINT_DIR}/{name}")

    def write_part(self, name: str, filename: str, data: bytes) -> None:
        self._put(name, filename, data)

    def commit(self, name: str, meta: CheckpointMeta) -> None:
        self._put(name, META_FILE, meta.to_json().encode())  # the commit marker, last
        self._prune(name)
        size = sum(p["size_bytes"] for p in meta.parts.values())
        log.info("checkpoint %s written (%d parts, %.2f MiB)", name, len(meta.parts), size / 2**20)

    def complete_names(self) -> list[str]:
        out = []
        for name in self._dirs():
            if self._has_meta(name):
                out.append(name)
            else:
                log.warning("checkpoint %s has no %s (incomplete write); skipping it",
                            name, META_FILE)
        return out

    def part_sizes(self, name: str) -> dict[str, int]:
        files = self.client.list_artifacts(self.run_id, f"{CHECKPOINT_DIR}/{name}")
        return {Path(f.path).name: int(f.file_size or 0) for f in files if not f.is_dir}

    def _get(self, name: str, filename: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            local = self._repo.download_artifacts(f"{CHECKPOINT_DIR}/{name}/{filename}", tmp)
            return Path(local).read_bytes()

    def read_meta(self, name: str) -> CheckpointMeta:
        return CheckpointMeta.from_json(self._get(name, META_FILE).decode())

    def read_part(self, name: str, filename: str) -> bytes:
        return self._get(name, filename)

    def _prune(self, newest: str) -> None:
        dirs = [n for n in self._dirs() if n <= newest]
        committed = {n for n in dirs if self._has_meta(n)}
        now = time.monotonic()
        for name in dirs:
            if name not in committed:
                self._first_seen.setdefault(name, now)

        def age_s(name: str) -> float:
            return now - self._first_seen[name]

        for name in prune_choice(dirs, committed, newest, self.keep_last, age_s, self.stale_s):
            if name not in committed:
                log.warning("deleting checkpoint %s: it has had no %s for %.0f s (a write cut "
                            "short)", name, META_FILE, age_s(name))
            try:
                self._repo.delete_artifacts(f"{CHECKPOINT_DIR}/{name}")
                self._first_seen.pop(name, None)
            except Exception as exc:  # noqa: BLE001 - pruning is best effort
                log.warning("could not delete old checkpoint %s: %s", name, exc)

    # Single-writer conveniences (a checkpoint with a shared part only).

    def save(self, state: dict[str, Any], meta_fields: dict[str, Any]) -> CheckpointMeta:
        """Write ``state`` as the shared part of a one-part checkpoint, then commit it."""
        name = dir_name(meta_fields["steps_done"])
        parts = {SHARED_PART: store_part(self, name, SHARED_PART, state)}
        meta = CheckpointMeta(parts=parts, **meta_fields)
        self.commit(name, meta)
        return meta

    def load_latest(self) -> tuple[dict[str, Any], CheckpointMeta] | None:
        """The shared part and metadata of the newest loadable checkpoint, or None."""
        found = latest_loadable(self)
        return None if found is None else (found[2], found[1])


def default_tracking_uri(configured: str | None) -> str:
    """Config, then ``MLFLOW_TRACKING_URI``, then ``sqlite:///<cwd>/mlflow.db``."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
