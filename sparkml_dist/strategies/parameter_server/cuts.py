"""Checkpoints of a parameter-server job: consistent cuts collected from the shards.

At a cut step k (:func:`sparkml_dist.algo.ps.is_cut`) every shard holds pulls for step k until
every worker has pushed k steps, then writes its state (values, optimizer and schedule state,
version, clocks) to a file on the driver's disk before answering. :class:`CutCollector` (a driver
thread) waits until every shard has written step k and commits ONE checkpoint of them all into
the run's checkpoint store: the shards at one logical step, and every worker's data position
(step k of its own deterministic data order). A resumed job starts its servers from that state
and its workers at step k, so no sample is skipped or seen twice. ``sync`` resumes bitwise (the
servers apply the same sums in the same order); ``async`` and ``ssp`` resume from the cut, but
what follows depends on the order pushes arrive in, so not bitwise.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import torch

from sparkml_dist.config import JobConfig, to_dict
from sparkml_dist.errors import CheckpointError, ConfigError
from sparkml_dist.strategies.parameter_server.plan import JobPlan
from sparkml_dist.training.checkpoint import check_fingerprint

log = logging.getLogger(__name__)

_NAME = re.compile(r"shard(\d+)-step(\d+)\.pt$")

RESUME_GUARANTEE = {
    "sync": "consistent cut, bitwise: a resumed sync job ends exactly where an uninterrupted one "
            "would",
    "async": "consistent cut: every shard at one step and every worker's data position; no "
             "sample skipped or seen twice, not bitwise (pushes arrive in another order)",
}
RESUME_GUARANTEE["ssp"] = RESUME_GUARANTEE["async"]


def fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """What a resumed job must share with the one that wrote the cut."""
    ps: Any = cfg.strategy
    return {"strategy": "parameter_server", "mode": ps.mode, "staleness": ps.staleness,
            "num_servers": ps.num_servers, "world_size": cfg.training.num_workers,
            "training.batch_size": cfg.training.batch_size,
            "training.seed": cfg.training.seed, "model.factory": cfg.model.factory,
            "model.kwargs": to_dict(cfg.model.kwargs)}


class CutCollector:
    """Turns the shards' cut files into checkpoints of the run, from a background thread."""

    def __init__(self, cut_dir: Path, plan: JobPlan, store: Any, fp: dict[str, Any],
                 interval_s: float = 0.5, join_timeout_s: float = 60.0,
                 lock_timeout_s: float = 900.0) -> None:
        self.cut_dir, self.plan, self.store, self.fp = cut_dir, plan, store, fp
        self.interval_s, self.join_timeout_s = interval_s, join_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self.failed_step: int | None = None
        self.saved: list[int] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one sweep at a time: the thread's and the final one
        self._thread = threading.Thread(target=self._loop, name="sparkml_dist-ps-cuts",
                                        daemon=True)
        self.error: BaseException | None = None
        """The first commit that failed in the background thread (retried on each sweep)."""

    def __enter__(self) -> CutCollector:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        """Stop the thread and commit the cuts written in the last moments (or just before a
        failure). A commit that still fails raises :class:`CheckpointError` naming its step,
        unless a training error is already propagating (then it is only logged, and the
        training error propagates)."""
        self._stop.set()
        self._thread.join(timeout=self.join_timeout_s)  # sweep() waits out a commit still running
        try:
            self.sweep()  # retries a step whose commit failed in the thread, oldest first
        except Exception as err:  # noqa: BLE001 - raised below, or logged under exc
            if exc is not None:
                log.exception("could not commit a parameter-server checkpoint (the job failed "
                              "already: %s)", exc)
                return
            cause = self.error or err
            raise CheckpointError(
                f"the parameter-server checkpoint at step {self.failed_step} could not be "
                f"committed into the run: {type(err).__name__}: {err}. Training ended, but "
                "its cuts (and final model) are not saved; check the tracking store "
                "(tracking.tracking_uri) and resume the run.") from cause
        if self.error is not None:
            log.warning("a parameter-server checkpoint commit failed once (%s) and succeeded "
                        "on retry", self.error)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - retried; raised by __exit__ if it lasts
                log.exception("could not commit a parameter-server checkpoint (retried)")
                if self.error is None:
                    self.error = exc

    def sweep(self) -> None:
        """Commit every step that all shards have written, oldest first, one caller at a time
        (the thread's sweep and the final one never save the same step twice); a failing
        commit raises and leaves its step in :attr:`failed_step`."""
        if not self._lock.acquire(timeout=self.lock_timeout_s):
            raise CheckpointError(f"a parameter-server checkpoint commit still runs after "
                                  f"{self.lock_timeout_s:.0f} s; the tracking store is not "
                                  "answering (tracking.tracking_uri).")
        try:
            self._sweep()
        finally:
            self._lock.release()

    def _sweep(self) -> None:
        by_step: dict[int, dict[int, Path]] = {}
        for path in self.cut_dir.glob("shard*-step*.pt"):
            m = _NAME.search(path.name)
            if m:
                by_step.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
        shards = len(self.plan.groups)
        for step in sorted(by_step):
            files = by_step[step]
            if len(files) < shards or step in self.saved:
                continue
            states = [torch.load(files[i], map_location="cpu", weights_only=True)
                      for i in range(shards)]
            spe = self.plan.steps_per_epoch
            try:
                self.store.save({"cut_step": step, "shards": states,
                                 "model": self.plan.state_from([s["values"] for s in states])},
                                {"steps_done": step, "epoch": step // spe,
                                 "step_in_epoch": step % spe, "fingerprint": self.fp})
            except Exception:
                self.failed_step = step
                raise
            self.saved.append(step)
            for p in files.values():
                p.unlink(missing_ok=True)
            log.info("checkpoint: consistent cut at step %d of %d shards", step, shards)


def load_cut(store: Any, cfg: JobConfig) -> tuple[int, list[dict[str, Any]]] | None:
    """The newest cut of the run (step, per-shard states), or None for a fresh run."""
    loaded = store.load_latest()
    if loaded is None:
        return None
    state, meta = loaded
    check_fingerprint(f"checkpoint at step {meta.steps_done}", meta.fingerprint,
                      fingerprint(cfg))
    if "shards" not in state:
        raise ConfigError(f"the run's newest checkpoint (step {meta.steps_done}) is its final "
                          "model, not a cut of running servers: the job completed.")
    return int(state["cut_step"]), list(state["shards"])
