"""Feature scaling that travels with the model: ``x' = (x - shift) * scale`` per feature.

``standard`` (z-score: shift = mean, scale = 1 / standard deviation) and ``minmax`` (shift = min,
scale = 1 / (max - min)), with statistics from the training split only (computed by Spark in
:mod:`sparkml_dist.spark.feature_scaling`). Shift and scale are float32, and the transform is two
float32 operations (subtract, then multiply), so Spark (JVM float arithmetic on the prepared
rows the ranks train on) and torch (:class:`ScaledModel`, the logged model every scorer loads:
pyfunc, the UDF, ``jobs/predict.py``) compute bitwise the same inputs from the same raw row.

Torch and numpy only: no Spark, MLflow or files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

ScaleKind = Literal["standard", "minmax"]

ARTIFACT = "preprocessing/feature_scaling.json"
"""Where the fitted scaling is stored in the run's artifacts."""


@dataclass(frozen=True)
class FeatureScaling:
    """A fitted per-feature affine scaling (float32 values)."""

    kind: ScaleKind
    shift: tuple[float, ...]
    scale: tuple[float, ...]
    train_rows: int
    """Training rows the statistics were computed from."""

    @staticmethod
    def from_stats(kind: ScaleKind, mean: np.ndarray, std: np.ndarray, lo: np.ndarray,
                   hi: np.ndarray, train_rows: int) -> FeatureScaling:
        """Shift and scale from per-feature statistics (float64); a constant feature gets
        scale 1 (it is only shifted)."""
        if kind == "standard":
            shift, spread = mean, std
        else:
            shift, spread = lo, hi - lo
        spread = np.where(np.isfinite(spread) & (spread > 0), spread, 1.0)
        scale = 1.0 / spread
        return FeatureScaling(kind=kind, shift=_f32(shift), scale=_f32(scale),
                              train_rows=int(train_rows))

    @property
    def width(self) -> int:
        return len(self.shift)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self.shift, dtype=np.float32), np.asarray(self.scale, dtype=np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The transform on a float32 ``(rows, width)`` array (the reference for Spark's)."""
        shift, scale = self.arrays()
        return (np.asarray(x, dtype=np.float32) - shift) * scale

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "shift": list(self.shift), "scale": list(self.scale),
                           "train_rows": self.train_rows, "formula": "(x - shift) * scale"})

    @staticmethod
    def from_json(text: str) -> FeatureScaling:
        v = json.loads(text)
        return FeatureScaling(kind=v["kind"], shift=tuple(v["shift"]), scale=tuple(v["scale"]),
                              train_rows=int(v["train_rows"]))


def _f32(values: np.ndarray) -> tuple[float, ...]:
    out = np.asarray(values, dtype=np.float64).astype(np.float32)
    assert all(math.isfinite(float(v)) for v in out), "scaling statistics must be finite"
    return tuple(float(v) for v in out)


class ScaledModel(nn.Module):
    """``net`` behind the fitted scaling: scores raw feature rows as training saw them."""

    def __init__(self, net: nn.Module, scaling: FeatureScaling) -> None:
        super().__init__()
        shift, scale = scaling.arrays()
        self.net = net
        self.register_buffer("shift", torch.from_numpy(shift.copy()))
        self.register_buffer("scale", torch.from_numpy(scale.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.shift) * self.scale)
