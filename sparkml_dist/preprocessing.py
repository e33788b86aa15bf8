"""Feature preprocessing that travels with the model: one-hot string columns
(``data.categorical_cols``, :class:`OneHotEncoding`), missing-value fill
(``data.on_invalid=fill``, :class:`MissingFill`) and feature scaling,
``x' = (x - shift) * scale`` per feature (``data.scale``, :class:`FeatureScaling`);
:class:`Preprocessing` holds what a job fitted.

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
    """What a job fitted on its training split, applied in this order: the one-hot expansion,
    the missing-value fill, then the scaling. The logged model carries them (:meth:`wrap`), so
    it scores raw rows."""

    fill: MissingFill | None = None
    scaling: FeatureScaling | None = None
    one_hot: OneHotEncoding | None = None

    def artifacts(self) -> dict[str, str]:
        """Run artifact path -> JSON of each fitted part."""
        out = {}
        if self.one_hot is not None:
            out[ONE_HOT_ARTIFACT] = self.one_hot.to_json()
        if self.fill is not None:
            out[FILL_ARTIFACT] = self.fill.to_json()
        if self.scaling is not None:
            out[ARTIFACT] = self.scaling.to_json()
        return out

    def wrap(self, net: nn.Module) -> nn.Module:
        """``net`` behind the scaling, the fill and the one-hot expansion: takes raw (with
        one-hot columns: coded) rows."""
        if self.scaling is not None:
            net = ScaledModel(net, self.scaling)
        if self.fill is not None:
            net = FilledModel(net, self.fill)
        if self.one_hot is not None:
            net = OneHotModel(net, self.one_hot)
        return net

    def model_metadata(self) -> dict[str, str]:
        """Metadata for the logged model: ``fills_missing`` tells scorers to send rows with
        missing values to the model (as NaN) instead of returning null for them."""
        return {"fills_missing": "true"} if self.fill is not None else {}

    def example(self, x: np.ndarray) -> np.ndarray:
        """Raw (coded) example rows with their missing values filled (for the model's input
        example)."""
        x = np.asarray(x, dtype=np.float32)
        if self.fill is None:
            return x
        k = x.shape[1] if self.one_hot is None else len(self.one_hot.numeric_cols)
        out = x.copy()
        out[:, :k] = np.where(np.isnan(x[:, :k]), self.fill.array()[:k], x[:, :k])
        return out


# ---------------------------------------------------------------------------------------------
# One-hot columns: ``data.categorical_cols``

ONE_HOT_ARTIFACT = "preprocessing/one_hot.json"
"""Where the fitted vocabularies are stored in the run's artifacts."""


@dataclass(frozen=True)
class OneHotEncoding:
    """Raw columns -> the rows the model trains on: the numeric columns, then one 0/1 feature per
    category of each categorical column, in the vocabulary's (sorted) order, categories being
    those seen in the training split; a null or unseen value is all zeros.

    The logged model takes *coded* rows (:meth:`encode`): the numeric values (NaN for missing),
    then per categorical column the index of its value in the vocabulary (-1: null or unseen);
    :class:`OneHotModel` expands the indices. Index comparison against exact small integers in
    float32 gives exactly 0 or 1 in Spark and torch alike.
    """

    numeric_cols: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...]
    """``(column, vocabulary)`` per categorical column."""

    @property
    def names(self) -> tuple[str, ...]:
        """Raw columns in the order the model takes them."""
        return self.numeric_cols + tuple(c for c, _ in self.categorical)

    @property
    def categories(self) -> dict[str, tuple[str, ...]]:
        return dict(self.categorical)

    @property
    def width(self) -> int:
        """Features after the one-hot expansion."""
        return len(self.numeric_cols) + sum(len(v) for _, v in self.categorical)

    def encode(self, columns: list[np.ndarray]) -> np.ndarray:
        """Coded float32 rows from one array per raw column (:attr:`names` order): numeric ones
        as floats (NaN for missing), categorical ones as objects (str, or None/NaN missing)."""
        n = len(columns[0]) if columns else 0
        out = np.empty((n, len(self.names)), np.float32)
        k = len(self.numeric_cols)
        for j in range(k):
            out[:, j] = np.asarray(columns[j], dtype=np.float32)
        for j, (_, vocab) in enumerate(self.categorical):
            index = {v: i for i, v in enumerate(vocab)}
            out[:, k + j] = [index.get(v, -1) if isinstance(v, str) else -1
                             for v in columns[k + j]]
        return out

    def expand(self, coded: np.ndarray) -> np.ndarray:
        """The one-hot rows of coded rows (the reference for Spark's and :class:`OneHotModel`)."""
        coded = np.asarray(coded, dtype=np.float32)
        k = len(self.numeric_cols)
        parts = [coded[:, :k]]
        for j, (_, vocab) in enumerate(self.categorical):
            parts.append((coded[:, k + j:k + j + 1] == np.arange(len(vocab), dtype=np.float32))
                         .astype(np.float32))
        return np.concatenate(parts, axis=1)

    def to_json(self) -> str:
        return json.dumps({"numeric_cols": list(self.numeric_cols),
                           "categorical": {c: list(v) for c, v in self.categorical}})

    @staticmethod
    def from_json(text: str) -> OneHotEncoding:
        v = json.loads(text)
        return OneHotEncoding(numeric_cols=tuple(v["numeric_cols"]),
                              categorical=tuple((c, tuple(vs))
                                                for c, vs in v["categorical"].items()))


class OneHotModel(nn.Module):
    """``net`` behind the one-hot expansion: takes coded rows (:meth:`OneHotEncoding.encode`)."""

    def __init__(self, net: nn.Module, encoding: OneHotEncoding) -> None:
        super().__init__()
        self.net = net
        self.numeric = len(encoding.numeric_cols)
        self.sizes = tuple(len(v) for _, v in encoding.categorical)
        self.register_buffer("codes", torch.arange(max(self.sizes, default=0),
                                                   dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, :self.numeric]]
        for j, size in enumerate(self.sizes):
            col = self.numeric + j
            parts.append((x[:, col:col + 1] == self.codes[:size]).to(x.dtype))
        return self.net(torch.cat(parts, dim=1))
