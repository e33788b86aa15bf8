"""Checkpoint uploads in the background, so a slow store never stalls the collectives.

A rank serializes its checkpoint parts in the step (fast, in memory) and hands the writes to the
store (the slow part: an MLflow artifact upload) to :class:`BackgroundUploads`, which runs them on
a thread while the rank goes on training. Rank 0's job writes its parts, waits until every other
rank's part is stored, and writes ``meta.json`` last, so a crash mid-upload leaves the previous
checkpoint the newest complete one.

At most one upload is in flight per rank: the next checkpoint (and the end of training) first
waits for the previous one with :meth:`BackgroundUploads.drain_together`, which every rank calls
at the same point. It polls in short rounds of a small all-gather, so no rank ever blocks in a
collective for longer than a round while a peer's upload finishes (a busy rank ends its round as
soon as its upload does), and every rank fails at once, with the same error, when one upload
failed or the store's ``upload_timeout_s`` passed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sparkml_dist.comm.base import Communicator
from sparkml_dist.errors import CheckpointError

log = logging.getLogger(__name__)


class BackgroundUploads:
    """One rank's checkpoint writes, one job at a time on a daemon thread."""

    def __init__(self, timeout_s: float, poll_s: float = 0.2) -> None:
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""

    def submit(self, what: str, job: Callable[[], None]) -> None:
        """Run ``job`` (the writes of checkpoint ``what``) in the background. The previous job
        must be finished (:meth:`drain_together`)."""
        assert not self.busy(), "a checkpoint upload is already in flight"
        self._error, self._what = None, what

        def run() -> None:
            t0 = time.perf_counter()
            try:
                job()
                log.info("checkpoint %s stored in the background in %.2f s", what,
                         time.perf_counter() - t0)
            except BaseException as exc:  # noqa: BLE001 - reported by drain_together
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"sparkml_dist-ckpt-{what}", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        """Whether an upload is still running."""
        return self._thread is not None and self._thread.is_alive()

    def problem(self) -> str | None:
        """Why the last upload failed, or None."""
        if self._error is None:
            return None
        return (f"storing checkpoint {self._what} failed: {type(self._error).__name__}: "
                f"{self._error}")

    def drain_together(self, comm: Communicator) -> None:
        """Every rank: return once no rank has an upload in flight; raise on every rank if one
        failed or has run past ``timeout_s``."""
        started = time.monotonic()
        while True:
            late = time.monotonic() - started > self.timeout_s
            states = comm.all_gather_object((self.busy(), self.problem(), late, self._what))
            problems = [f"rank {r}: {p}" for r, (_, p, _, _) in enumerate(states) if p]
            if problems:
                raise CheckpointError("; ".join(problems))
            busy = [r for r, (b, _, _, _) in enumerate(states) if b]
            if not busy:
                return
            if any(x for _, _, x, _ in states):
                raise CheckpointError(
                    f"checkpoint {states[busy[0]][3]} is still being stored by rank(s) "
                    f"{', '.join(map(str, busy))} after {self.timeout_s:.0f} s "
                    "(checkpoint.upload_timeout_s); training stops rather than wait longer. The "
                    "store is too slow for the checkpoint's size: check its health, raise "
                    "checkpoint.upload_timeout_s, or checkpoint less often "
                    "(checkpoint.every_steps).")
            self._next_round()

    def _next_round(self) -> None:
        """Wait until this rank's upload ends, at most ``poll_s``: the round after it starts as
        soon as the last upload is stored, not at the next tick of a fixed poll. A rank with
        nothing in flight goes straight on and waits in that round's all-gather for the busy
        ones, at most ``poll_s`` too."""
        if self._thread is not None:
            self._thread.join(self.poll_s)

    def wait_alone(self, timeout_s: float) -> None:
        """This rank only (no collectives, for a rank that is failing or exiting): give the
        upload in flight up to ``timeout_s`` to finish, so a checkpoint whose parts are all
        stored still gets committed."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("checkpoint %s is still being stored after %.0f s; leaving it",
                            self._what, timeout_s)
            elif self._error is not None:
                log.warning("%s", self.problem())
