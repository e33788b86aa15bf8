"""A checkpoint store in a local (or shared, mounted) directory.

Same layout and commit protocol as the MLflow store (:mod:`sparkml_dist.training.checkpoint`):
parts first, ``meta.json`` last, each file written to a temporary name and renamed, so a reader
never sees half a file. Used to drive the rank loop without Spark or MLflow (tests, GPU checks)
and for jobs that keep checkpoints on shared storage.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from sparkml_dist.training.checkpoint import (
    DEFAULT_UPLOAD_TIMEOUT_S, META_FILE, STALE_INCOMPLETE_S, CheckpointMeta, prune_choice)

log = logging.getLogger(__name__)


class DirectoryCheckpointStore:
    """:class:`~sparkml_dist.training.checkpoint.CheckpointStore` under ``root``.

    ``stale_s``: an uncommitted checkpoint directory whose newest file is older than this is a
    write cut short, which pruning may delete (younger: maybe another writer's, kept).
    ``upload_timeout_s``: how long the rank loop waits for a background write to this store.
    """

    def __init__(self, root: str | os.PathLike[str], keep_last: int = 2, *,
                 stale_s: float = STALE_INCOMPLETE_S,
                 upload_timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.stale_s = stale_s
        self.upload_timeout_s = upload_timeout_s
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
        dirs = self._dirs()
        committed = {n for n in dirs if (self.root / n / META_FILE).exists()}
        for old in prune_choice(dirs, committed, name, self.keep_last, self._age_s, self.stale_s):
            if old not in committed:
                log.warning("deleting checkpoint %s: no %s and untouched for %.0f s (a write cut "
                            "short)", old, META_FILE, self._age_s(old))
            shutil.rmtree(self.root / old, ignore_errors=True)

    def _dirs(self) -> list[str]:
        return sorted((p.name for p in self.root.glob("ckpt-*") if p.is_dir()), reverse=True)

    def _age_s(self, name: str) -> float:
        """Seconds since anything under checkpoint ``name`` was last written."""
        d = self.root / name
        try:
            newest = max([d.stat().st_mtime] + [p.stat().st_mtime for p in d.iterdir()])
        except FileNotFoundError:  # deleted meanwhile
            return 0.0
        return time.time() - newest

    def complete_names(self) -> list[str]:
        return [n for n in self._dirs() if (self.root / n / META_FILE).exists()]

    def part_sizes(self, name: str) -> dict[str, int]:
        d = self.root / name
        if not d.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in d.iterdir()
                if p.is_file() and not p.name.startswith(".")}

    def read_meta(self, name: str) -> CheckpointMeta:
        return CheckpointMeta.from_json((self.root / name / META_FILE).read_text())

    def read_part(self, name: str, filename: str) -> bytes:
        return (self.root / name / filename).read_bytes()
