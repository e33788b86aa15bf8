"""Checkpoints: parts written by the ranks, one commit marker written last.

A checkpoint ``ckpt-<steps>/`` holds ``shared.pt`` (state every rank holds identically: model,
optimizer, schedule..., written once by rank 0), ``rank-NNNNN.pt`` for each rank that has state of
its own (error-feedback residuals...), and ``meta.json``. Rank 0 writes ``meta.json`` only after
every rank reported its part stored (size and SHA-256 of each part are in it), so a checkpoint
counts only once its metadata exists; every part's checksum is checked on load.

Data order and dropout randomness are pure functions of (seed, epoch, rank, step), so the step
count is the random-number state. Resume agreement: rank 0 picks the newest complete checkpoint
and broadcasts its name; every rank loads exactly that one or fails. ``meta.json`` also records a
fingerprint (strategy and its settings, world size, data layout): resuming with a different one
fails with the difference, since the saved state would not mean the same thing.

Parts are read with ``torch.load(weights_only=True)``: a part that carries pickled code is
refused.

Several writers may share one store (a resumed run's new driver while the old one's last upload
still lands): pruning (:func:`prune_choice`) deletes only checkpoints it listed as committed, and
a directory without ``meta.json`` (maybe another writer's upload in progress) only once it is older
than :data:`STALE_INCOMPLETE_S`; nothing newer than the checkpoint just committed is touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any, Protocol

import torch

from sparkml_dist.errors import USER_ERROR_MARKER, CheckpointError

log = logging.getLogger(__name__)

SHARED_PART = "shared.pt"
META_FILE = "meta.json"
BEST_NAME = "best"
"""Directory of the best epoch's model (``training.early_stopping.keep_best``): a checkpoint in
the same format holding ``{"model": state_dict}`` in its shared part. Its name has no ``ckpt-``
prefix, so pruning and resume never see it."""


STALE_INCOMPLETE_S = 3600.0
"""A checkpoint directory without ``meta.json`` is another writer's upload in progress until it
is this old (seconds); after that pruning may delete it as a write that was cut short."""

DEFAULT_UPLOAD_TIMEOUT_S = 900.0
"""How long a checkpoint's upload may take (a store's ``upload_timeout_s``) before the job fails
with a clear error rather than waiting on it for ever."""


def part_file(rank: int) -> str:
    """File name of ``rank``'s own part."""
    return f"rank-{rank:05d}.pt"


def dir_name(steps_done: int) -> str:
    """Checkpoint directory name; zero-padded so names sort in step order."""
    return f"ckpt-{steps_done:010d}"


@dataclass(frozen=True)
class PartInfo:
    """Size and checksum of one stored part."""

    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class CheckpointMeta:
    """Written last; its presence is what makes a checkpoint complete."""

    steps_done: int
    epoch: int
    step_in_epoch: int
    final: bool = False
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """File name -> ``{"sha256", "size_bytes"}`` of every part."""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """What a resumed job must match: strategy settings, world size, data layout."""
    early_stopping: dict[str, Any] = field(default_factory=dict)
    """State of the early-stopping rule after this checkpoint's step (empty when unused)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> CheckpointMeta:
        values = json.loads(text)
        known = {f for f in CheckpointMeta.__dataclass_fields__}
        return CheckpointMeta(**{k: v for k, v in values.items() if k in known})

    def part(self, name: str) -> PartInfo | None:
        info = self.parts.get(name)
        return PartInfo(info["sha256"], info["size_bytes"]) if info else None


def encode_part(state: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Serialize a part; return its bytes and its entry for ``CheckpointMeta.parts``."""
    data, digest = encode_state(state)
    return data, {"sha256": digest, "size_bytes": len(data)}


def encode_state(state: dict[str, Any]) -> tuple[bytes, str]:
    """Serialize a state dict; return the bytes and their SHA-256."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def decode_state(data: bytes, info: PartInfo, what: str) -> dict[str, Any]:
    """Check size and checksum, then load tensors and plain containers only.

    Raises ValueError for a corrupt part and :class:`CheckpointError` for one that holds anything
    but tensors and plain data (pickled code is never run)."""
    if len(data) != info.size_bytes or hashlib.sha256(data).hexdigest() != info.sha256:
        raise ValueError(f"{what} is corrupt: {len(data)} bytes on disk, {info.size_bytes} "
                         "expected, or checksum mismatch")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{USER_ERROR_MARKER} {what} holds more than tensors and plain data (it would run "
            f"pickled code when loaded), so it is refused: {str(exc).splitlines()[0]}. Only "
            "checkpoints written by sparkml_dist load; if this run's artifacts were replaced, "
            "start a new run.") from None


class CheckpointStore(Protocol):
    """Where checkpoint files live (the MLflow run, in production)."""

    def write_part(self, name: str, filename: str, data: bytes) -> None:
        """Store one part of checkpoint ``name``."""

    def commit(self, name: str, meta: CheckpointMeta) -> None:
        """Write ``meta.json`` (the commit marker) of ``name``; then prune old checkpoints."""

    def complete_names(self) -> list[str]:
        """Names of checkpoints that have a ``meta.json``, newest first."""

    def read_meta(self, name: str) -> CheckpointMeta:
        """The metadata of checkpoint ``name``."""

    def read_part(self, name: str, filename: str) -> bytes:
        """One part of checkpoint ``name``."""

    def part_sizes(self, name: str) -> dict[str, int]:
        """File name -> size in bytes of every file stored so far under checkpoint ``name``."""


def store_part(store: CheckpointStore, name: str, filename: str,
               state: dict[str, Any]) -> dict[str, Any]:
    """Encode and write one part; return its entry for ``CheckpointMeta.parts``."""
    data, info = encode_part(state)
    store.write_part(name, filename, data)
    return info


_FIRST_POLL_S = 0.01


def wait_for_parts(store: CheckpointStore, name: str, sizes: dict[str, int],
                   timeout_s: float, poll_s: float = 0.2) -> None:
    """Wait until every part in ``sizes`` (file name -> bytes) is stored whole under ``name``
    (written by other ranks), at most ``timeout_s``; then the commit marker may follow.

    The store is listed again after 10 ms, then at doubling intervals up to ``poll_s``: parts
    written alongside this rank's usually land within the first few, and a store that is slow
    to receive them is listed every ``poll_s`` after that."""
    deadline = time.monotonic() + timeout_s
    delay = min(_FIRST_POLL_S, poll_s)
    while True:
        stored = store.part_sizes(name) if sizes else {}
        missing = sorted(f for f, n in sizes.items() if stored.get(f) != n)
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise CheckpointError(
                f"checkpoint {name}: the parts {', '.join(missing)} of other ranks were not stored "
                f"within {timeout_s:.0f} s, so it is not committed (the previous checkpoint "
                "stays the newest). Check the checkpoint store's health and speed.")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(2 * delay, poll_s)


def prune_choice(dirs: list[str], committed: set[str], newest: str, keep_last: int,
                 age_s: Callable[[str], float], stale_s: float = STALE_INCOMPLETE_S) -> list[str]:
    """Which checkpoint directories a writer that just committed ``newest`` deletes.

    ``dirs`` are the ``ckpt-*`` names listed, ``committed`` those of them listed with a
    ``meta.json``, ``age_s(name)`` how long an uncommitted one has existed. Kept: anything newer
    than ``newest`` (another writer's), the ``keep_last`` newest committed ones, and every
    uncommitted one younger than ``stale_s`` (maybe another writer's upload in progress).
    """
    out = []
    kept = 0
    for name in sorted(dirs, reverse=True):
        if name > newest:
            continue
        if name in committed:
            kept += 1
            if kept > keep_last:
                out.append(name)
        elif name != newest and age_s(name) >= stale_s:
            out.append(name)
    return out


def load_part(store: CheckpointStore, name: str, meta: CheckpointMeta,
              filename: str) -> dict[str, Any]:
    """Read and verify one part listed in ``meta``."""
    info = meta.part(filename)
    if info is None:
        raise CheckpointError(f"checkpoint {name} has no part {filename}; it lists "
                              f"{', '.join(sorted(meta.parts)) or 'none'}")
    return decode_state(store.read_part(name, filename), info, f"{name}/{filename}")


def latest_loadable(store: CheckpointStore) -> tuple[str, CheckpointMeta, dict[str, Any]] | None:
    """The newest complete checkpoint whose shared part reads back intact, with that part.

    Incomplete or corrupt checkpoints are skipped for older ones, with a warning. When complete
    checkpoints exist but none loads, that is an error, never a silent restart from step 0.
    """
    names = store.complete_names()
    failures = []
    for name in names:
        try:
            meta = store.read_meta(name)
            shared = load_part(store, name, meta, SHARED_PART)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - fall back to the previous checkpoint
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", name, exc)
            failures.append(f"{name}: {exc}")
            continue
        return name, meta, shared
    if failures:
        raise CheckpointError(f"{USER_ERROR_MARKER} the run has {len(names)} complete "
                              f"checkpoint(s) and none loads ({'; '.join(failures)}); refusing to "
                              "restart from step 0 over them. Start a new run, or delete the "
                              "broken checkpoints from the run's artifacts.")
    return None


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every setting that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def check_fingerprint(name: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume into a job whose strategy, world size or layout differs."""
    diff = fingerprint_diff(saved, current)
    if diff:
        raise CheckpointError(
            f"{USER_ERROR_MARKER} checkpoint {name} was written by a job with other settings "
            f"({'; '.join(diff)}); its state cannot be resumed by this one. Resume with the "
            "checkpoint's settings, or start a new run.")
