"""The job's one MLflow run, as the driver sees it: create or resume, params, tags, failures,
the final model and the training-curve plot."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from sparkml_dist.config import JobConfig, to_dict
from sparkml_dist.errors import ConfigError
from sparkml_dist.tracking.mlflow_store import default_tracking_uri
from sparkml_dist.tracking.redact import Redactor, redact

log = logging.getLogger(__name__)

ATTEMPTS_TAG = "sparkml_dist.attempts"
HEARTBEAT_TAG = "sparkml_dist.heartbeat"
"""``{"time", "host", "pid"}`` (JSON) of the run's driver, refreshed every :data:`HEARTBEAT_S`."""
HEARTBEAT_S = 30.0
"""How often a live driver refreshes :data:`HEARTBEAT_TAG`."""
HEARTBEAT_STALE_S = 3 * HEARTBEAT_S
"""A RUNNING run whose heartbeat is younger than this has a live driver: resuming it is refused."""


class JobRun:
    """Handle on the run of one job; created once on the driver, its id sent to every rank."""

    def __init__(self, cfg: JobConfig, resume_run_id: str | None = None, *,
                 force_resume: bool = False) -> None:
        self.tracking_uri = default_tracking_uri(cfg.tracking.tracking_uri)
        self.redactor = Redactor({"config": to_dict(cfg), "tracking_uri": self.tracking_uri})
        """Removes this job's secrets from text bound for the run or the logs."""
        self.client = MlflowClient(self.tracking_uri)
        self._beating = threading.Event()
        if resume_run_id:
            run = self.client.get_run(resume_run_id)  # raises a clear MlflowException if unknown
            if run.info.status == "FINISHED":
                raise ConfigError(f"run {resume_run_id} is FINISHED: its training completed and "
                                  "its model was logged, so there is nothing to resume. Start a "
                                  "new run (omit resume_run_id / --resume).")
            _check_owner(run, force_resume)
            self.run_id = run.info.run_id
            self.attempts_so_far = int(run.data.tags.get(ATTEMPTS_TAG, "0"))
            self.client.set_terminated(self.run_id, "RUNNING")
            log.info("resuming MLflow run %s after %d earlier attempts", self.run_id,
                     self.attempts_so_far)
        else:
            exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
            if exp is None:
                location = None
                if self.tracking_uri.startswith("sqlite:///"):
                    db = Path(self.tracking_uri[len("sqlite:///"):])
                    location = (db.parent / "mlruns").resolve().as_uri()
                exp_id = self.client.create_experiment(cfg.tracking.experiment, location)
            else:
                exp_id = exp.experiment_id
            run = self.client.create_run(exp_id, run_name=cfg.tracking.run_name)
            self.run_id = run.info.run_id
            self.attempts_so_far = 0
            self._log_config(cfg)
        self.experiment_id = run.info.experiment_id

    def _log_config(self, cfg: JobConfig) -> None:
        from mlflow.entities import Param

        from sparkml_dist.config import from_dict, to_dict

        # Secrets (read options named like passwords or keys, a tracking URI's password) are
        # redacted in both the params and the resolved config artifact.
        safe = redact(to_dict(cfg))
        # One log_batch: MLflow's client splits it into calls of at most 100 params each.
        self.client.log_batch(self.run_id, params=[
            Param(k, v[:6000]) for k, v in sorted(from_dict(safe).flat().items())])
        self.client.log_dict(self.run_id, safe, "config/resolved.json")

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set ``tags`` (values as text, this job's secrets redacted) in one ``log_batch``."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, self.redactor.text(str(v)))
                                                 for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the ``params`` the run does not have yet (a resumed run keeps its values), in
        one ``log_batch``."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        self.client.log_batch(self.run_id, params=[Param(k, self.redactor.text(str(v)))
                                                   for k, v in params.items()
                                                   if k not in existing])

    def record_attempt(self, attempt: int) -> None:
        self.client.set_tag(self.run_id, ATTEMPTS_TAG, str(attempt + 1))

    def log_failure(self, attempt: int, failure: dict[str, Any]) -> None:
        """Record a failed attempt: tag, metric and a JSON artifact with the log tail (secrets of
        the job redacted: the error may quote a URI with its password, or a read option)."""
        failure = self.redactor.value(failure)
        self.client.set_tag(self.run_id, f"sparkml_dist.failure.{attempt}",
                            f"{failure.get('kind', 'error')} (reported by rank "
                            f"{failure.get('rank')}): {failure.get('error', '')[:400]}")
        self.client.log_metric(self.run_id, "fault/failed_attempts", attempt + 1, step=attempt)
        self.client.log_dict(self.run_id, failure, f"failures/attempt-{attempt}.json")

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> None:
        """Refresh :data:`HEARTBEAT_TAG` every ``interval_s`` until :meth:`finish`, so a second
        driver can tell that this run has a live owner."""
        self._beat()
        self._beating.set()

        def loop() -> None:
            while self._beating.is_set():
                time.sleep(interval_s)
                if self._beating.is_set():
                    try:
                        self._beat()
                    except Exception as exc:  # noqa: BLE001 - a missed beat only weakens a check
                        log.warning("could not refresh the run's heartbeat: %s", exc)

        threading.Thread(target=loop, name="sparkml_dist-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        self.client.set_tag(self.run_id, HEARTBEAT_TAG, json.dumps(
            {"time": round(time.time(), 3), "host": socket.gethostname(), "pid": os.getpid()}))

    def stop_heartbeat(self) -> None:
        self._beating.clear()

    def finish_after(self, exc: BaseException) -> None:
        """End the run for an exception that stops the job: KILLED for Ctrl-C, else FAILED."""
        self.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")

    def finish(self, status: str = "FINISHED") -> None:
        self.stop_heartbeat()
        self.client.set_terminated(self.run_id, status)

    def log_training_curves(self) -> None:
        """Loss and validation metric per step as ``plots/training_curves.png``."""
        from sparkml_dist.tracking.plots import training_curves

        series = {k: self.metric_history(k)
                  for k in ("train/loss", "val/loss", "val/accuracy", "val/rmse")}
        series = {k: v for k, v in series.items() if v}
        if not series:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "training_curves.png")
            training_curves(series, path)
            self.client.log_artifact(self.run_id, str(path), "plots")

    def log_model(self, model: Any, example: Any, classes: tuple[Any, ...],
                  registered_model_name: str | None,
                  metadata: dict[str, str] | None = None, raw_columns: Any = None,
                  step: int = 0) -> str:
        """Log the final model with a signature and input example (and ``metadata`` next to the
        classes in its MLmodel); return its model URI. ``raw_columns`` (a
        :class:`~sparkml_dist.preprocessing.OneHotEncoding`): the model takes coded rows, and
        its pyfunc raw rows by column name (:mod:`sparkml_dist.tracking.raw_rows`). ``step``:
        the training step the weights are from; MLflow links the run's metrics of that step
        (the validation of the last or best epoch) to the logged model."""
        import torch
        from mlflow.models import infer_signature

        model.eval()
        with torch.no_grad():
            out = model(torch.as_tensor(example)).numpy()
        signature = infer_signature(example, out)
        # log_model only takes the global URI, and setting it also sets MLFLOW_TRACKING_URI in
        # this process's environment (inherited by subprocesses): restore both exactly.
        previous, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            info = self._log_model_in_run(model, signature, example, classes, registered_model_name,
                                          metadata or {}, raw_columns, step)
        finally:
            mlflow.set_tracking_uri(previous)
            if previous_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env
        self.client.set_terminated(self.run_id, "RUNNING")  # start_run's exit ended it
        return info.model_uri

    def _log_model_in_run(self, model: Any, signature: Any, example: Any,
                          classes: tuple[Any, ...], registered_model_name: str | None,
                          metadata: dict[str, str], raw_columns: Any = None,
                          step: int = 0) -> Any:
        import mlflow.pytorch
        import torch

        kwargs = dict(
            signature=signature, input_example=example,
            registered_model_name=registered_model_name, step=step,
            # Named here rather than inferred: inference imports the model in a subprocess.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            metadata={"classes": json.dumps([_plain(c) for c in classes]), **metadata})
        with mlflow.start_run(run_id=self.run_id):
            if raw_columns is None:
                return mlflow.pytorch.log_model(model, name="model", **kwargs)
            from mlflow.models import Model

            from sparkml_dist.tracking import raw_rows

            return Model.log(artifact_path=None, name="model", flavor=raw_rows,
                             pytorch_model=model, raw_columns=raw_columns,
                             serialization_format="pt2", **kwargs)


def _check_owner(run: Any, force: bool) -> None:
    """Refuse to resume a RUNNING run whose driver is alive (fresh heartbeat), unless forced. A
    driver on this host whose process is gone counts as dead at once."""
    beat = run.data.tags.get(HEARTBEAT_TAG)
    if run.info.status != "RUNNING" or beat is None:
        return
    owner = json.loads(beat)
    age = time.time() - float(owner["time"])
    if age >= HEARTBEAT_STALE_S or (owner.get("host") == socket.gethostname()
                                    and not _pid_alive(int(owner["pid"]))):
        return
    if force:
        log.warning("run %s has a live driver (heartbeat %.0f s ago); resuming anyway "
                    "(force_resume)", run.info.run_id, age)
        return
    raise ConfigError(f"run {run.info.run_id} is RUNNING and its driver was alive {age:.0f} s ago "
                      f"(tag {HEARTBEAT_TAG}); two drivers would write the same checkpoints. Wait "
                      f"until that driver ends or its heartbeat is {HEARTBEAT_STALE_S:.0f} s old, "
                      "or pass force_resume=True if you know it is gone.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
