"""Batches for the rank loop, on the device, in the loop's data order.

Three ways, picked once per rank by :func:`make_feed`:

- ``resident`` (GPU, the shard fits ``data.device_cache_share`` of free GPU memory): the whole
  shard is copied to the GPU once, in storage order; each step's batch is an ``index_select`` on
  the GPU at the rows' storage positions (:meth:`ShardStore.physical`).
- ``prefetch`` (GPU, shard too large): a background thread gathers the next batches into pinned
  host buffers and starts their copy on a side CUDA stream, a bounded queue of depth 2, so the
  copy of step n+1 overlaps the compute of step n.
- ``host`` (CPU): the batch is gathered on the calling thread (``torch.index_select`` on the
  contiguous shard; a thread would only compete with the step for the same cores).

Every way yields exactly the rows the data order names, so results do not depend on the way.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from sparkml_dist.data.shard_store import ShardStore

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def choose_mode(store: ShardStore, device: torch.device, share: float, prefetch: bool) -> str:
    """``resident``, ``prefetch`` or ``host`` for this shard on this device."""
    if device.type != "cuda":
        return "host"
    if share > 0:
        free, _ = torch.cuda.mem_get_info(device)
        need = store.features.nbytes + store.labels.nbytes
        if need <= share * free:
            return "resident"
    return "prefetch" if prefetch else "host"


class BatchFeed:
    """Yields the batch of each step ``start..total-1``; ``indices(step)`` names its rows."""

    def __init__(self, store: ShardStore, device: torch.device,
                 indices: Callable[[int], np.ndarray], mode: str) -> None:
        self.store = store
        self.device = device
        self.indices = indices
        self.mode = mode
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        if mode == "resident":
            self._x = torch.from_numpy(np.ascontiguousarray(store.features)).to(device)
            self._y = torch.from_numpy(np.ascontiguousarray(store.labels)).to(device)
            log.info("the shard (%d rows, %.1f MiB) lives on %s", len(store),
                     (store.features.nbytes + store.labels.nbytes) / 2**20, device)

    def batches(self, start: int, total: int) -> Iterator[Batch]:
        if self.mode == "resident":
            for step in range(start, total):
                # A pinned source keeps the copy asynchronous: from pageable memory the driver
                # may wait for the stream, a host sync per step. The caching host allocator
                # holds the pinned block until the copy is done.
                i = torch.from_numpy(self.store.physical(self.indices(step))).pin_memory().to(
                    self.device, non_blocking=True)
                yield torch.index_select(self._x, 0, i), torch.index_select(self._y, 0, i)
        elif self.mode == "prefetch":
            yield from _Prefetcher(self.store, self.device, self.indices, start, total)
        else:
            for step in range(start, total):
                x, y = self.store.gather(self.indices(step))
                yield x.to(self.device), y.to(self.device)


class _Prefetcher:
    """Background gather into pinned buffers and copy on a side stream; bounded queue."""

    DEPTH = 2

    def __init__(self, store: ShardStore, device: torch.device,
                 indices: Callable[[int], np.ndarray], start: int, total: int) -> None:
        self.store, self.device, self.indices = store, device, indices
        self.start, self.total = start, total
        self.q: queue.Queue[object] = queue.Queue(maxsize=self.DEPTH)
        self.stream = torch.cuda.Stream(device)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="sparkml_dist-prefetch",
                                       daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            for step in range(self.start, self.total):
                if self.stop.is_set():
                    return
                x, y = self.store.gather(self.indices(step))
                with torch.cuda.stream(self.stream):
                    xd = x.pin_memory().to(self.device, non_blocking=True)
                    yd = y.pin_memory().to(self.device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                self.q.put((xd, yd, event))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
            self.q.put(exc)

    def __iter__(self) -> Iterator[Batch]:
        try:
            for _ in range(self.start, self.total):
                item = self.q.get()
                if isinstance(item, BaseException):
                    raise item
                xd, yd, event = item  # type: ignore[misc]
                torch.cuda.current_stream(self.device).wait_event(event)
                xd.record_stream(torch.cuda.current_stream(self.device))
                yd.record_stream(torch.cuda.current_stream(self.device))
                yield xd, yd
        finally:
            self.stop.set()
            while not self.q.empty():  # unblock the worker if it waits on a full queue
                self.q.get_nowait()


def make_feed(store: ShardStore, device: torch.device, indices: Callable[[int], np.ndarray],
              share: float, prefetch: bool) -> BatchFeed:
    """The feed for this rank's training shard (see the module docstring for the modes)."""
    return BatchFeed(store, device, indices, choose_mode(store, device, share, prefetch))
