"""Early stopping on a validation metric: patience and minimum improvement, in epochs.

The rule of Prechelt, "Early Stopping - But When?" (Neural Networks: Tricks of the Trade, 1998),
in the form Keras and Lightning use: after each epoch's validation, the metric improves when it
beats the best value so far by more than ``min_delta`` (lower for ``min``, higher for ``max``);
training stops once ``patience`` epochs in a row brought no improvement. Pure Python: the loop
feeds it the all-reduced metric, so every rank takes the same decision, and its state travels in
the checkpoint's metadata so a resumed run continues the count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EarlyStoppingState:
    """What the rule remembers between epochs (JSON-able, stored in ``meta.json``)."""

    best: float | None = None
    """Best metric value so far (None before the first validation)."""
    best_epoch: int = 0
    """1-based epoch whose validation gave ``best``."""
    bad_epochs: int = 0
    """Epochs in a row since the last improvement."""
    stopped: bool = False
    """The rule fired: no further epoch runs."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict[str, Any] | None) -> EarlyStoppingState:
        known = set(EarlyStoppingState.__dataclass_fields__)
        return EarlyStoppingState(**{k: v for k, v in (values or {}).items() if k in known})


class EarlyStopping:
    """Decide after each epoch whether the metric improved and whether to stop."""

    def __init__(self, mode: str, patience: int, min_delta: float,
                 state: EarlyStoppingState | None = None) -> None:
        assert mode in ("min", "max") and patience >= 1 and min_delta >= 0
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.state = state or EarlyStoppingState()

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        best = self.state.best
        if best is None:
            return math.isfinite(value)
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Record epoch ``epoch``'s (1-based) metric; return True when it is the new best.

        After the call, ``state.stopped`` says whether training should end after this epoch."""
        improved = self.improves(value)
        if improved:
            self.state.best, self.state.best_epoch, self.state.bad_epochs = value, epoch, 0
        else:
            self.state.bad_epochs += 1
        self.state.stopped = self.state.bad_epochs >= self.patience
        return improved

