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
    META_FILE, STATE_FILE, CheckpointMeta, decode_state, dir_name, encode_state)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class MlflowSink:
    """Writes metrics into the run, one batch call per report, from a background thread so a
    slow tracking store never stalls a training step. ``flush()`` waits for the queue."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._queue: queue.Queue[list[Metric] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="sparkml_dist-metrics",
                                        daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is not None and self._error is None:
                    self.client.log_batch(self.run_id, metrics=batch)
            except BaseException as exc:  # noqa: BLE001 - surfaced by the next call
                self._error = exc
            finally:
                self._queue.task_done()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._error is not None:
            raise RuntimeError(f"logging metrics to MLflow failed: {self._error}") from self._error
        now = int(time.time() * 1000)
        self._queue.put([Metric(key=k, value=float(v), timestamp=now, step=step)
                         for k, v in metrics.items()])

    def flush(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise RuntimeError(f"logging metrics to MLflow failed: {self._error}") from self._error


class MlflowCheckpointStore:
    """Checkpoints as run artifacts under ``checkpoints/ckpt-<steps>/``.

    The state file is uploaded first and ``meta.json`` (size + SHA-256) last, so a checkpoint is
    complete only once its metadata exists; loading re-checks the checksum.
    """

    def __init__(self, tracking_uri: str, run_id: str, keep_last: int = 2) -> None:
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.keep_last = keep_last
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

    def save(self, state: dict[str, Any], meta_fields: dict[str, Any]) -> CheckpointMeta:
        data, digest = encode_state(state)
        meta = CheckpointMeta(sha256=digest, size_bytes=len(data), **meta_fields)
        name = dir_name(meta.steps_done)
        with tempfile.TemporaryDirectory() as tmp:
            state_path, meta_path = Path(tmp, STATE_FILE), Path(tmp, META_FILE)
            state_path.write_bytes(data)
            meta_path.write_text(meta.to_json())
            self._repo.log_artifact(str(state_path), f"{CHECKPOINT_DIR}/{name}")
            self._repo.log_artifact(str(meta_path), f"{CHECKPOINT_DIR}/{name}")  # commit marker
        self._prune(name)
        log.info("checkpoint %s written (%.2f MiB)", name, len(data) / 2**20)
        return meta

    def _prune(self, newest: str) -> None:
        kept = 0
        for name in self._dirs():
            if name > newest:
                continue
            complete = self._has_meta(name)
            if complete and kept < self.keep_last:
                kept += 1
                continue
            try:
                self._repo.delete_artifacts(f"{CHECKPOINT_DIR}/{name}")
            except Exception as exc:  # noqa: BLE001 - pruning is best effort
                log.warning("could not delete old checkpoint %s: %s", name, exc)

    def load_latest(self) -> tuple[dict[str, Any], CheckpointMeta] | None:
        for name in self._dirs():
            if not self._has_meta(name):
                log.warning("checkpoint %s has no %s (incomplete write); skipping it",
                            name, META_FILE)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                local = self._repo.download_artifacts(f"{CHECKPOINT_DIR}/{name}", tmp)
                try:
                    meta = CheckpointMeta.from_json(Path(local, META_FILE).read_text())
                    state = decode_state(Path(local, STATE_FILE).read_bytes(), meta)
                except Exception as exc:  # noqa: BLE001 - fall back to the previous checkpoint
                    log.warning("checkpoint %s is unreadable (%s); using the previous one",
                                name, exc)
                    continue
            return state, meta
        return None


def default_tracking_uri(configured: str | None) -> str:
    """Config, then ``MLFLOW_TRACKING_URI``, then ``sqlite:///<cwd>/mlflow.db``."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
