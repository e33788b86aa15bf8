"""Bounded waits shared by the background writers (metrics, gossip messages): nothing waits
forever."""

from __future__ import annotations

import queue
import time
from typing import Any


def join_within(q: queue.Queue[Any], timeout_s: float) -> int:
    """Wait until every item put on ``q`` is marked done (``Queue.join``), at most ``timeout_s``;
    return how many are still unfinished (0: all done). Waits on the queue's own condition, so
    it wakes as the last item is done instead of polling."""
    done = q.all_tasks_done
    deadline = time.monotonic() + timeout_s
    with done:
        while q.unfinished_tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done.wait(left)
        return q.unfinished_tasks
