"""The bounded queue wait behind the metrics sink's and the gossip outbox's flush."""

import queue
import threading
import time

from sparkml_dist.waits import join_within


def test_join_within_wakes_when_the_last_item_is_done():
    q: queue.Queue[int] = queue.Queue()
    for i in range(3):
        q.put(i)

    def worker():
        for _ in range(3):
            q.get()
            time.sleep(0.05)
            q.task_done()

    threading.Thread(target=worker, daemon=True).start()
    t0 = time.monotonic()
    assert join_within(q, 30.0) == 0
    assert time.monotonic() - t0 < 5.0  # woke with the last task_done, not at the bound


def test_join_within_returns_what_is_unfinished_at_the_bound():
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    q.put(2)
    q.get()
    q.task_done()
    t0 = time.monotonic()
    assert join_within(q, 0.2) == 1
    assert 0.2 <= time.monotonic() - t0 < 5.0
    assert join_within(queue.Queue(), 0.0) == 0  # nothing queued: done at once
