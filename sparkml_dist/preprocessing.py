"""Feature preprocessing that travels with the model: missing-value fill (``data.on_invalid=fill``,
:class:`MissingFill`) and feature scaling, ``x' = (x - shift) * scale`` per feature
(``data.scale``, :class:`FeatureScaling`); :class:`Preprocessing` holds what a job fitted.

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


# ---------------------------------------------------------------------------------------------
# Missing values: ``data.on_invalid=fill``

FillKind = Literal["mean", "median", "zero"]

FILL_ARTIFACT = "preprocessing/missing_fill.json"
"""Where the fitted fill values are stored in the run's artifacts."""


@dataclass(frozen=True)
class MissingFill:
    """Per-feature values that replace a missing (null or NaN) raw feature value (float32),
    fitted on the training split. Applied before any scaling: ``x' = fill if isnan(x) else x``,
    a selection (no arithmetic), so Spark and torch give bitwise the same rows."""

    kind: FillKind
    values: tuple[float, ...]
    missing: tuple[int, ...]
    """Training rows with the feature missing, per feature."""
    train_rows: int

    @staticmethod
    def from_stats(kind: FillKind, mean: np.ndarray, median: np.ndarray, missing: np.ndarray,
                   train_rows: int) -> MissingFill:
        """Fill values from per-feature statistics of the non-missing training values (NaN
        where a feature has none: it is filled with 0)."""
        chosen = {"mean": mean, "median": median,
                  "zero": np.zeros_like(np.asarray(mean, dtype=np.float64))}[kind]
        chosen = np.where(np.isfinite(chosen), chosen, 0.0)
        return MissingFill(kind=kind, values=_f32(chosen),
                           missing=tuple(int(m) for m in missing), train_rows=int(train_rows))

    @property
    def width(self) -> int:
        return len(self.values)

    def array(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The fill on a float32 ``(rows, width)`` array (the reference for Spark's)."""
        x = np.asarray(x, dtype=np.float32)
        return np.where(np.isnan(x), self.array(), x)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "values": list(self.values),
                           "missing": list(self.missing), "train_rows": self.train_rows,
                           "formula": "fill if x is null or NaN else x"})

    @staticmethod
    def from_json(text: str) -> MissingFill:
        v = json.loads(text)
        return MissingFill(kind=v["kind"], values=tuple(v["values"]),
                           missing=tuple(int(m) for m in v["missing"]),
                           train_rows=int(v["train_rows"]))


class FilledModel(nn.Module):
    """``net`` (e.g. a :class:`ScaledModel`) behind the fitted fill: scores raw rows with
    missing values (NaN) as training saw them."""

    def __init__(self, net: nn.Module, fill: MissingFill) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("fill", torch.from_numpy(fill.array().copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.where(torch.isnan(x), self.fill, x))


@dataclass(frozen=True)
class Preprocessing:
    """What a job fitted on its training split, applied in this order: the missing-value fill,
    then the scaling. The logged model carries both (:meth:`wrap`), so it scores raw rows."""

    fill: MissingFill | None = None
    scaling: FeatureScaling | None = None

    def artifacts(self) -> dict[str, str]:
        """Run artifact path -> JSON of each fitted part."""
        out = {}
        if self.fill is not None:
            out[FILL_ARTIFACT] = self.fill.to_json()
        if self.scaling is not None:
            out[ARTIFACT] = self.scaling.to_json()
        return out

    def wrap(self, net: nn.Module) -> nn.Module:
        """``net`` behind the scaling, behind the fill: takes raw rows."""
        if self.scaling is not None:
            net = ScaledModel(net, self.scaling)
        if self.fill is not None:
            net = FilledModel(net, self.fill)
        return net

    def model_metadata(self) -> dict[str, str]:
        """Metadata for the logged model: ``fills_missing`` tells scorers to send rows with
        missing values to the model (as NaN) instead of returning null for them."""
        return {"fills_missing": "true"} if self.fill is not None else {}

    def example(self, x: np.ndarray) -> np.ndarray:
        """Raw example rows with their missing values filled (for the model's input example)."""
        return self.fill.apply(x) if self.fill is not None else np.asarray(x, dtype=np.float32)
