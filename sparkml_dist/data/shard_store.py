"""A rank's shard, held once as Arrow buffers and reused across epochs.

Record batches stream in from Spark (``mapInArrow``). Features arrive as one ``list<float>``
column; their values buffers are viewed as ``(rows, width)`` numpy arrays without a copy, and each
row is routed to the store of its (shard, split). When the rows held pass a memory budget, the
features of every store so far and every later row go to one raw float32 file per store on local
disk, which is then memory-mapped: the operating system pages it in, so a shard larger than RAM
still trains (labels and row numbers, a few bytes a row, stay in memory).

Rows may arrive in any order (the prepared frame is not sorted within its partitions: a sort in
Spark costs more than one here); a store's rows are its row numbers in ascending order, which is
what the data order indexes. Each store ends as ONE contiguous ``(rows, width)`` array (in memory
or mapped), so a batch is a single ``torch.index_select`` into a fresh tensor, as fast as
indexing a tensor that was loaded whole. Finishing an in-memory store copies its pieces once,
each row straight to its place in row order; pieces are released as they are copied, so the
peak stays near one copy of the shard. A spilled store keeps its file in arrival order and maps
positions through a permutation (``ShardStore.physical``), so nothing is rewritten on disk.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

log = logging.getLogger(__name__)

FEATURES = "__features"
LABEL = "__label"
ROW = "__row"
SHARD = "__shard"
SPLIT = "__split"  # 0 = train, 1 = validation


@dataclass
class _Chunk:
    features: np.ndarray  # (n, width) float32 view into an Arrow buffer
    labels: np.ndarray    # (n,) int64 or float32 view
    rows: np.ndarray      # (n,) int64 global row numbers (any order in a builder's pieces)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``a``'s memory (read-only Arrow buffers included: only read from)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": never written
        return torch.from_numpy(a)


def _concat(parts: list[np.ndarray], shape_tail: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """One contiguous array of ``parts``, emptying the list as it copies (a lone piece as is)."""
    if len(parts) == 1:
        return parts.pop()
    out = np.empty((sum(len(p) for p in parts), *shape_tail), dtype=dtype)
    at = 0
    while parts:
        p = parts.pop(0)
        out[at:at + len(p)] = p
        at += len(p)
    return out


class ShardStore:
    """Rows of one split of one shard, stored contiguously and addressed in ascending global row
    order: positions given to :meth:`gather` and :meth:`physical`, and :meth:`row_ids`, are in
    row order.

    ``order`` (optional): the storage position of each row in row order, when storage is not in
    row order (a spilled store keeps arrival order). The attributes ``features``, ``labels`` and
    ``rows`` are in STORAGE order; map positions with :meth:`physical` before indexing them.
    """

    def __init__(self, chunks: list[_Chunk], width: int, spilled_path: str | None = None,
                 keepalive: object | None = None, label_dtype: Any = None,
                 order: np.ndarray | None = None) -> None:
        chunks = [c for c in chunks if len(c.rows)]
        self.width = width
        self.spilled_path = spilled_path
        self._keepalive = keepalive  # e.g. the memory map the arrays point into
        if len(chunks) > 1:
            last = [c.rows[-1] for c in chunks[:-1]]
            first = [c.rows[0] for c in chunks[1:]]
            assert all(a < b for a, b in zip(last, first)), "shard rows arrived out of order"
        if chunks:
            label_dtype = chunks[0].labels.dtype
        label_dtype = np.dtype(np.int64 if label_dtype is None else label_dtype)
        self.features = _concat([c.features for c in chunks] or
                                [np.empty((0, width), np.float32)], (width,), np.float32)
        self.labels = _concat([c.labels for c in chunks] or [np.empty(0, label_dtype)], (),
                              label_dtype)
        self.rows = _concat([c.rows for c in chunks] or [np.empty(0, np.int64)], (), np.int64)
        if order is not None and len(order) != len(self.rows):
            raise ValueError(f"order names {len(order)} positions for {len(self.rows)} rows")
        self._order = None if order is None else np.ascontiguousarray(order, dtype=np.int64)
        self._x = _as_tensor(self.features)
        self._y = _as_tensor(self.labels)
        self.arrow_nbytes = self.features.nbytes + self.labels.nbytes + self.rows.nbytes

    @property
    def _chunks(self) -> list[_Chunk]:  # one contiguous chunk (benchmarks report the count)
        return [_Chunk(self.features, self.labels, self.rows)] if len(self) else []

    def __len__(self) -> int:
        return len(self.rows)

    def row_ids(self) -> np.ndarray:
        """Global row numbers of this shard's rows, ascending."""
        return self.rows if self._order is None else self.rows[self._order]

    def physical(self, idx: np.ndarray) -> np.ndarray:
        """Storage positions (indices into ``features`` and ``labels``) of rows ``idx``
        (positions in row order)."""
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        return idx if self._order is None else self._order[idx]

    def gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of rows ``idx`` (positions in this shard, in row order), in that
        order, as new tensors."""
        i = torch.from_numpy(self.physical(idx))
        return torch.index_select(self._x, 0, i), torch.index_select(self._y, 0, i)

    def iter_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All rows in row order, ``batch_size`` at a time (for evaluation), as new tensors."""
        for start in range(0, len(self), batch_size):
            end = min(start + batch_size, len(self))
            if self._order is not None:
                yield self.gather(np.arange(start, end))
            else:
                yield self._x[start:end].clone(), self._y[start:end].clone()


def _chunk_from_batch(batch: pa.RecordBatch, width: int) -> _Chunk:
    feats = batch.column(FEATURES)
    if isinstance(feats, pa.ChunkedArray):
        feats = feats.combine_chunks()
    values = feats.flatten()  # respects the array's offset; zero-copy when contiguous
    if values.null_count:
        raise ValueError("null feature values reached a rank; the driver's validation should "
                         "have rejected them")
    x = values.to_numpy(zero_copy_only=values.type == pa.float32()).astype(np.float32, copy=False)
    if width and x.size != len(batch) * width:
        raise ValueError(f"feature rows have uneven widths; expected {width} values per row")
    y = batch.column(LABEL).to_numpy(zero_copy_only=False)
    rows = batch.column(ROW).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return _Chunk(x.reshape(len(batch), width), y, rows)


class _Pieces:
    """What has arrived for one (shard, split): in-memory pieces, or a spill file of features."""

    def __init__(self) -> None:
        self.features: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.path: str | None = None
        self.file: Any = None
        self.spilled_rows = 0

    def spill(self, spill_dir: str | None) -> None:
        fd, self.path = tempfile.mkstemp(prefix="sparkml_dist_shard_", suffix=".f32",
                                         dir=spill_dir)
        self.file = os.fdopen(fd, "wb")
        for x in self.features:
            self.write(x)
        self.features = []

    def write(self, x: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(x, dtype=np.float32).data)
        self.spilled_rows += len(x)

    def store(self, width: int, label_dtype: np.dtype) -> ShardStore:
        labels = _concat(self.labels or [np.empty(0, label_dtype)], (), label_dtype)
        rows = _concat(self.rows or [np.empty(0, np.int64)], (), np.int64)
        order = _row_order(rows)
        if self.path is None:
            if order is None:
                features = _concat(self.features or [np.empty((0, width), np.float32)],
                                   (width,), np.float32)
            else:
                features = _place(self.features, order, width)
                labels, rows = labels[order], rows[order]
            return ShardStore([_Chunk(features, labels, rows)], width, label_dtype=label_dtype)
        self.file.close()
        if self.spilled_rows:
            # Copy-on-write mapping: writable for torch, never written, paged in on demand.
            features = np.memmap(self.path, np.float32, "c", shape=(self.spilled_rows, width))
        else:
            features = np.empty((0, width), np.float32)
        os.unlink(self.path)  # the mapping stays valid; the disk space goes with the task
        return ShardStore([_Chunk(features, labels, rows)], width, self.path, features,
                          label_dtype, order)


def _row_order(rows: np.ndarray) -> np.ndarray | None:
    """Positions of ``rows`` in ascending order; None when they already ascend. Row numbers are
    unique: a repeated one means the shard-to-partition mapping is broken."""
    if len(rows) < 2:
        return None
    step = np.diff(rows)
    if (step > 0).all():
        return None
    order = np.argsort(rows, kind="stable")  # arrival is runs of ascending rows: cheap to sort
    if (np.diff(rows[order]) == 0).any():
        raise AssertionError("a shard received the same row number twice; the shard-to-"
                             "partition mapping is broken")
    return order


def _place(pieces: list[np.ndarray], order: np.ndarray, width: int) -> np.ndarray:
    """One ``(rows, width)`` array with arrival row ``order[k]`` at position ``k``: each piece is
    copied once, straight into place, and released."""
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    out = np.empty((len(order), width), np.float32)
    at = 0
    while pieces:
        p = pieces.pop(0)
        out[where[at:at + len(p)]] = p
        at += len(p)
    return out


class ShardBuilder:
    """Collects a task's record batches into train and validation :class:`ShardStore`s, per
    shard: :meth:`finish_shards` for a rank that reads several shards of the data layout,
    :meth:`finish` for one."""

    def __init__(self, width: int, memory_budget_bytes: int, spill_dir: str | None = None,
                 label_type: pa.DataType = pa.int64(),
                 expected_shards: tuple[int, ...] | None = None,
                 num_shards: int | None = None) -> None:
        self.width = width
        self.num_shards = num_shards
        """Shards in the data layout. Given, batches may leave out the ``__shard`` column: a
        row's shard is then its row number modulo ``num_shards`` (the prepared frame's rule), so
        Spark converts and sends one column less per row."""
        self.budget = memory_budget_bytes
        self.spill_dir = spill_dir
        self.label_type = label_type
        self._pieces: dict[tuple[int, int], _Pieces] = {}
        self._nbytes = 0
        self._spilled = False
        self.expected_shards: tuple[int, ...] | None = (
            None if expected_shards is None else tuple(int(x) for x in expected_shards))
        """The shards this task may receive (its rank's shards in the data layout); rows of any
        other shard are an error. None accepts any shard."""

    @property
    def expected_shard(self) -> int | None:
        """The one expected shard (alias of ``expected_shards`` with a single entry)."""
        if self.expected_shards is None:
            return None
        if len(self.expected_shards) != 1:
            raise ValueError(f"this builder expects shards {self.expected_shards}, not one; "
                             "read expected_shards instead.")
        return self.expected_shards[0]

    @expected_shard.setter
    def expected_shard(self, shard: int | None) -> None:
        self.expected_shards = None if shard is None else (int(shard),)

    def _shards_of(self, batch: pa.RecordBatch, rows: np.ndarray) -> np.ndarray:
        expected = self.expected_shards
        if SHARD in batch.schema.names:
            shards = batch.column(SHARD).to_numpy(zero_copy_only=False).astype(np.int64,
                                                                                copy=False)
        elif self.num_shards is not None:
            shards = rows % self.num_shards
        elif expected is not None and len(expected) > 1:
            raise ValueError(f"batches carry no {SHARD} column and the builder knows no "
                             f"num_shards, so rows cannot be assigned to the expected shards "
                             f"{expected}")
        else:
            return np.full(len(batch), expected[0] if expected else 0, np.int64)
        if expected is not None:
            bad = ~np.isin(shards, np.asarray(expected, dtype=np.int64))
            if bad.any():
                who = (f"rank {expected[0]}" if len(expected) == 1
                       else f"a rank of shards {expected}")
                raise AssertionError(f"{who} received rows of shard {int(shards[bad][0])}; "
                                     "the shard-to-partition mapping is broken")
        return shards

    def add(self, batch: pa.RecordBatch) -> None:
        """Take one record batch from the task's input stream."""
        if len(batch) == 0:
            return
        splits = batch.column(SPLIT).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        chunk = _chunk_from_batch(pa.RecordBatch.from_arrays(
            [batch.column(FEATURES).cast(pa.list_(pa.float32())),
             batch.column(LABEL).cast(self.label_type), batch.column(ROW)],
            names=[FEATURES, LABEL, ROW]), self.width)
        shards = self._shards_of(batch, chunk.rows)
        keys = shards * 2 + splits
        if (keys == keys[0]).all():
            parts = [(int(keys[0]), chunk)]
        else:
            parts = [(int(k), _Chunk(chunk.features[m], chunk.labels[m], chunk.rows[m]))
                     for k in np.unique(keys) for m in [keys == k]]
        for key, c in parts:
            pieces = self._pieces.setdefault((key // 2, key % 2), _Pieces())
            pieces.labels.append(c.labels)
            pieces.rows.append(c.rows)
            if self._spilled:
                if pieces.file is None:
                    pieces.spill(self.spill_dir)
                pieces.write(c.features)
            else:
                pieces.features.append(c.features)
            self._nbytes += c.features.nbytes + c.labels.nbytes + c.rows.nbytes
        if not self._spilled and self._nbytes > self.budget:
            self._spill()

    def _spill(self) -> None:
        for pieces in self._pieces.values():
            pieces.spill(self.spill_dir)
        self._spilled = True
        log.info("shard passed its memory budget of %.1f MiB; spilling features to %s",
                 self.budget / 2**20, self.spill_dir or tempfile.gettempdir())

    def extend(self, batches: Iterable[pa.RecordBatch]) -> ShardBuilder:
        """Take every batch of an iterator."""
        for b in batches:
            self.add(b)
        return self

    def _store(self, shard: int, split: int) -> ShardStore:
        pieces = self._pieces.pop((shard, split), None)
        label_dtype = np.dtype(self.label_type.to_pandas_dtype())
        if pieces is None:
            return ShardStore([], self.width, label_dtype=label_dtype)
        return pieces.store(self.width, label_dtype)

    def finish_shards(self) -> dict[int, tuple[ShardStore, ShardStore]]:
        """(train, validation) stores of every expected shard, empty ones included; spilled data
        is memory-mapped, not read. Without ``expected_shards``: the shards that arrived."""
        shards = self.expected_shards
        if shards is None:
            shards = tuple(sorted({s for s, _ in self._pieces}))
        return {s: (self._store(s, 0), self._store(s, 1)) for s in shards}

    def finish(self) -> tuple[ShardStore, ShardStore]:
        """(train, validation) stores of the single expected shard (of the one shard that arrived
        when none is expected); spilled data is memory-mapped, not read."""
        shards = self.expected_shards
        if shards is None:
            shards = tuple(sorted({s for s, _ in self._pieces})) or (0,)
        if len(shards) != 1:
            raise ValueError(f"finish() returns one shard but this builder expects (or received) "
                             f"shards {shards}; call finish_shards().")
        return self._store(shards[0], 0), self._store(shards[0], 1)
