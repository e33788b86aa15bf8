"""A checkpoint store in a local (or shared, mounted) directory.

Same layout and commit protocol as the MLflow store (:mod:`sparkml_dist.training.checkpoint`):
parts first, ``meta.json`` last, each file written to a temporary name and renamed, so a reader
never sees half a file. Used to drive the rank loop without Spark or MLflow (tests, GPU checks)
and for jobs that keep checkpoints on shared storage.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sparkml_dist.training.checkpoint import META_FILE, CheckpointMeta


class DirectoryCheckpointStore:
    """:class:`~sparkml_dist.training.checkpoint.CheckpointStore` under ``root``."""

    def __init__(self, root: str | os.PathLike[str], keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.root.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, filename: str, data: bytes) -> None:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{filename}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, d / filename)

    def write_part(self, name: str, filename: str, data: bytes) -> None:
        self._write(name, filename, data)

    def commit(self, name: str, meta: CheckpointMeta) -> None:
        self._write(name, META_FILE, meta.to_json().encode())
        complete = self.complete_names()
        for old in complete[self.keep_last:]:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def complete_names(self) -> list[str]:
        names = sorted((p.name for p in self.root.glob("ckpt-*") if p.is_dir()), reverse=True)
        return [n for n in names if (self.root / n / META_FILE).exists()]

    def read_meta(self, name: str) -> CheckpointMeta:
        return CheckpointMeta.from_json((self.root / name / META_FILE).read_text())

    def read_part(self, name: str, filename: str) -> bytes:
        return (self.root / name / filename).read_bytes()
