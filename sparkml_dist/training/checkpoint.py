"""Checkpoint state and the storage contract.

A checkpoint holds everything needed to replay the rest of a run identically: model, optimizer and
LR-scheduler state plus the number of optimizer steps done. Data order and dropout randomness are
pure functions of (seed, epoch, rank, step), so the step count is the random-number state.

A checkpoint counts only once its metadata (size and SHA-256 of the state file) is written, and
the state file's checksum is checked on load: a partial or corrupt checkpoint is skipped in favour
of the previous one.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class CheckpointMeta:
    """Written last; its presence is what makes a checkpoint complete."""

    steps_done: int
    epoch: int
    step_in_epoch: int
    sha256: str
    size_bytes: int
    final: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> CheckpointMeta:
        return CheckpointMeta(**json.loads(text))


def dir_name(steps_done: int) -> str:
    """Checkpoint directory name; zero-padded so names sort in step order."""
    return f"ckpt-{steps_done:010d}"


def encode_state(state: dict[str, Any]) -> tuple[bytes, str]:
    """Serialize a state dict; return the bytes and their SHA-256."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def decode_state(data: bytes, meta: CheckpointMeta) -> dict[str, Any]:
    """Check size and checksum, then load; raise ValueError for a corrupt file."""
    if len(data) != meta.size_bytes or hashlib.sha256(data).hexdigest() != meta.sha256:
        raise ValueError(f"checkpoint at step {meta.steps_done} is corrupt: {len(data)} bytes "
                         f"on disk, {meta.size_bytes} expected, or checksum mismatch")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


class CheckpointStore(Protocol):
    """Where checkpoints live (the MLflow run, in production)."""

    def save(self, state: dict[str, Any], meta_fields: dict[str, Any]) -> CheckpointMeta:
        """Write ``state`` then its metadata; return the metadata."""

    def load_latest(self) -> tuple[dict[str, Any], CheckpointMeta] | None:
        """The newest complete, intact checkpoint, or None."""
