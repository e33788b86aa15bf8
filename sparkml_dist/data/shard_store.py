"""A rank's shard, held once as Arrow buffers and reused across epochs.

Record batches stream in from Spark (``mapInArrow``). Features arrive as one ``list<float>``
column; their values buffers are viewed as ``(rows, width)`` numpy arrays without a copy. When a
shard grows past a memory budget, every batch so far and every later one goes to an Arrow IPC file
on local disk, which is then memory-mapped: the operating system pages it in, so a shard larger
than RAM still trains. Batches for a step are gathered by row index into fresh tensors.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
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
    rows: np.ndarray      # (n,) int64 global row numbers, ascending


class ShardStore:
    """Rows of one split of one shard, in ascending global row order."""

    def __init__(self, chunks: list[_Chunk], width: int, spilled_path: str | None = None,
                 keepalive: object | None = None) -> None:
        self._chunks = [c for c in chunks if len(c.rows)]
        self.width = width
        self.spilled_path = spilled_path
        self._keepalive = keepalive  # the memory map / batches the views point into
        sizes = [len(c.rows) for c in self._chunks]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.arrow_nbytes = sum(c.features.nbytes + c.labels.nbytes + c.rows.nbytes
                                for c in self._chunks)
        if len(self._chunks) > 1:
            last = [c.rows[-1] for c in self._chunks[:-1]]
            first = [c.rows[0] for c in self._chunks[1:]]
            assert all(a < b for a, b in zip(last, first)), "shard rows arrived out of order"

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def row_ids(self) -> np.ndarray:
        """Global row numbers of this shard's rows, in storage order."""
        if not self._chunks:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([c.rows for c in self._chunks])

    def gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of rows ``idx`` (positions in this shard), in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        n = len(idx)
        label_dtype = self._chunks[0].labels.dtype if self._chunks else np.int64
        x = np.empty((n, self.width), dtype=np.float32)
        y = np.empty(n, dtype=label_dtype)
        if len(self._chunks) == 1:
            c = self._chunks[0]
            np.take(c.features, idx, axis=0, out=x)
            np.take(c.labels, idx, out=y)
        else:
            # Group the requested rows by chunk once (a stable sort), then copy chunk by chunk.
            which = np.searchsorted(self._offsets, idx, side="right") - 1
            order = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[order], np.arange(len(self._chunks) + 1))
            for ci in range(len(self._chunks)):
                sel = order[bounds[ci]:bounds[ci + 1]]
                if len(sel):
                    local = idx[sel] - self._offsets[ci]
                    x[sel] = self._chunks[ci].features[local]
                    y[sel] = self._chunks[ci].labels[local]
        return torch.from_numpy(x), torch.from_numpy(y)

    def iter_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All rows in storage order, ``batch_size`` at a time (for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.gather(np.arange(start, min(start + batch_size, len(self))))


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


class ShardBuilder:
    """Collects a task's record batches into train and validation :class:`ShardStore`s, per
    shard: :meth:`finish_shards` for a rank that reads several shards of the data layout,
    :meth:`finish` for one."""

    def __init__(self, width: int, memory_budget_bytes: int, spill_dir: str | None = None,
                 label_type: pa.DataType = pa.int64(),
                 expected_shards: tuple[int, ...] | None = None) -> None:
        self.width = width
        self.budget = memory_budget_bytes
        self.spill_dir = spill_dir
        self.label_type = label_type
        self._batches: list[pa.RecordBatch] = []
        self._nbytes = 0
        self._writer: ipc.RecordBatchFileWriter | None = None
        self._sink: pa.NativeFile | None = None
        self._path: str | None = None
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

    def _schema(self) -> pa.Schema:
        return pa.schema([(FEATURES, pa.list_(pa.float32())), (LABEL, self.label_type),
                          (ROW, pa.int64()), (SHARD, pa.int32()), (SPLIT, pa.int8())])

    def _shard_column(self, batch: pa.RecordBatch) -> pa.Array:
        expected = self.expected_shards
        if SHARD not in batch.schema.names:
            if expected is not None and len(expected) > 1:
                raise ValueError(f"batches carry no {SHARD} column, so rows cannot be assigned "
                                 f"to the expected shards {expected}")
            return pa.array(np.full(len(batch), expected[0] if expected else 0, np.int32))
        col = batch.column(SHARD).cast(pa.int32())
        if expected is not None:
            shards = col.to_numpy(zero_copy_only=False)
            bad = ~np.isin(shards, np.asarray(expected, dtype=np.int32))
            if bad.any():
                who = f"rank {expected[0]}" if len(expected) == 1 else f"a rank of shards {expected}"
                raise AssertionError(f"{who} received rows of shard {int(shards[bad][0])}; "
                                     "the shard-to-partition mapping is broken")
        return col

    def _normalize(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays(
            [batch.column(FEATURES).cast(pa.list_(pa.float32())),
             batch.column(LABEL).cast(self.label_type),
             batch.column(ROW).cast(pa.int64()), self._shard_column(batch),
             batch.column(SPLIT).cast(pa.int8())],
            schema=self._schema())

    def add(self, batch: pa.RecordBatch) -> None:
        """Take one record batch from the task's input stream."""
        if len(batch) == 0:
            return
        batch = self._normalize(batch)
        if self._writer is not None:
            self._writer.write_batch(batch)
            return
        self._batches.append(batch)
        self._nbytes += batch.nbytes
        if self._nbytes > self.budget:
            self._spill()

    def _spill(self) -> None:
        fd, self._path = tempfile.mkstemp(prefix="sparkml_dist_shard_", suffix=".arrow",
                                          dir=self.spill_dir)
        os.close(fd)
        self._sink = pa.OSFile(self._path, "wb")
        self._writer = ipc.new_file(self._sink, self._schema())
        for b in self._batches:
            self._writer.write_batch(b)
        log.info("shard passed its memory budget of %.1f MiB; spilling to %s",
                 self.budget / 2**20, self._path)
        self._batches = []

    def extend(self, batches: Iterable[pa.RecordBatch]) -> ShardBuilder:
        """Take every batch of an iterator."""
        for b in batches:
            self.add(b)
        return self

    def _close(self) -> tuple[list[pa.RecordBatch], object]:
        """The batches taken so far (memory-mapped if spilled) and what keeps them alive."""
        keepalive: object = self._batches
        batches: list[pa.RecordBatch] = self._batches
        if self._writer is not None:
            self._writer.close()
            assert self._sink is not None
            self._sink.close()
            source = pa.memory_map(self._path, "r")
            os.unlink(self._path)  # the mapping stays valid; the disk space goes with the task
            reader = ipc.open_file(source)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            keepalive = (source, batches)
        return batches, keepalive

    def finish_shards(self) -> dict[int, tuple[ShardStore, ShardStore]]:
        """(train, validation) stores of every expected shard, empty ones included; spilled data
        is memory-mapped, not read. Without ``expected_shards``: the shards that arrived."""
        batches, keepalive = self._close()
        shards = self.expected_shards
        if shards is None:
            shards = tuple(sorted({int(s) for b in batches
                                   for s in np.unique(b.column(SHARD).to_numpy())}))
        return {shard: self._stores_of(batches, keepalive, shard) for shard in shards}

    def finish(self) -> tuple[ShardStore, ShardStore]:
        """(train, validation) stores of the single expected shard (every row when no shard is
        expected); spilled data is memory-mapped, not read."""
        shards = self.expected_shards
        if shards is not None and len(shards) != 1:
            raise ValueError(f"finish() returns one shard but this builder expects shards "
                             f"{shards}; call finish_shards().")
        batches, keepalive = self._close()
        return self._stores_of(batches, keepalive, None)

    def _stores_of(self, batches: list[pa.RecordBatch], keepalive: object,
                   shard: int | None) -> tuple[ShardStore, ShardStore]:
        """Train and validation stores of one shard (None: of every row)."""
        stores = []
        for split in (0, 1):
            chunks = []
            for b in batches:
                mask = b.column(SPLIT).to_numpy(zero_copy_only=False) == split
                if shard is not None:
                    mask &= b.column(SHARD).to_numpy(zero_copy_only=False) == shard
                if mask.all():
                    chunks.append(_chunk_from_batch(b, self.width))
                elif mask.any():
                    chunks.append(_chunk_from_batch(b.filter(pa.array(mask)), self.width))
            stores.append(ShardStore(chunks, self.width, self._path, keepalive))
        return stores[0], stores[1]
