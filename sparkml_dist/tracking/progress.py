"""Live progress on the driver, fed from the metrics rank 0 writes into the run.

A background thread polls the run every few seconds: training never waits on it. In a notebook
the bar is a widget (``tqdm.auto``); under ``spark-submit`` it is a console bar on a terminal and
a log line per update otherwise.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


class ProgressReporter:
    """Polls ``progress/epoch``, ``train/loss`` and ``perf/samples_per_s`` of a run."""

    def __init__(self, client: MlflowClient, run_id: str, interval_s: float = 2.0,
                 enabled: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.interval_s = interval_s
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self.last_step = 0
        self.t0 = time.monotonic()

    def __enter__(self) -> ProgressReporter:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="sparkml_dist-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=self.interval_s + 5)
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - progress is best effort
            pass
        if self._bar is not None:
            self._bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - progress must never break training
                log.debug("progress poll failed: %s", exc)

    def poll(self) -> str | None:
        """Read the run's latest metrics and update the display; return the status line."""
        metrics = self.client.get_run(self.run_id).data.metrics
        total = int(metrics.get("progress/total_steps", 0))
        hist = self.client.get_metric_history(self.run_id, "train/loss")
        if not hist or not total:
            return None
        step = max(m.step for m in hist)
        if step == self.last_step:
            return None
        rate = metrics.get("perf/samples_per_s", 0.0)
        step_s = metrics.get("time/step_s", 0.0)
        eta = (total - step) * step_s
        line = (f"epoch {metrics.get('progress/epoch', 0):.2f} step {step}/{total} "
                f"loss {metrics.get('train/loss', float('nan')):.4f} {rate:,.0f} samples/s "
                f"ETA {eta:,.0f}s")
        if "val/accuracy" in metrics:
            line += f" val_acc {metrics['val/accuracy']:.4f}"
        self._show(step, total, line)
        self.last_step = step
        return line

    def _show(self, step: int, total: int, line: str) -> None:
        interactive = "ipykernel" in sys.modules or sys.stderr.isatty()
        if interactive:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc="training", unit="step")
            self._bar.set_postfix_str("loss " + line.split(" loss ", 1)[-1], refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            log.info("progress: %s", line)
