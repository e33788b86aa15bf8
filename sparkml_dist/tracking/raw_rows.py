"""The logged model of a job with one-hot columns (``data.categorical_cols``): a PyTorch model
whose pyfunc takes raw rows by column name (numbers, with nulls; strings).

The torch program takes float32 rows of the numeric features followed by one category index per
categorical column (-1: null or unseen) and does the one-hot, fill and scaling itself
(:meth:`sparkml_dist.preprocessing.Preprocessing.wrap`). The MLmodel keeps the ``pytorch``
flavor (what the scoring UDF loads, mapping strings to indices in Spark SQL), and its
``python_function`` flavor loads through :func:`_load_pyfunc` here, which maps a pandas
DataFrame of raw columns to those rows. The signature names the raw columns (``double`` and
``string``). The mapping (:class:`~sparkml_dist.preprocessing.OneHotEncoding`) is stored in the
model's metadata (``raw_columns``).

Used as MLflow's ``flavor`` argument of ``Model.log``: :func:`save_model` saves with
``mlflow.pytorch`` and then switches the pyfunc loader and the signature.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sparkml_dist.preprocessing import OneHotEncoding

log = logging.getLogger(__name__)

METADATA_KEY = "raw_columns"
"""The model metadata key holding :meth:`OneHotEncoding.to_json`."""
_EXAMPLE_FILES = ("input_example.json", "serving_input_example.json")


def save_model(pytorch_model: Any, path: str, mlflow_model: Any, *, raw_columns: OneHotEncoding,
               **kwargs: Any) -> None:
    """``mlflow.pytorch.save_model`` (its ``signature`` and ``input_example`` are the float32
    rows the program takes), then the raw-rows interface: the pyfunc loader, the raw columns'
    signature and metadata; the float input example is removed (it is not a raw row)."""
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
    outputs = mlflow_model.signature.outputs if mlflow_model.signature else None
    mlflow_model.signature = ModelSignature(
        inputs=Schema([ColSpec("string" if c in raw_columns.categories else "double", c,
                               required=False) for c in raw_columns.names]),
        outputs=outputs)
    for name in _EXAMPLE_FILES:
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    mlflow_model.saved_input_example_info = None
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.metadata = {**(mlflow_model.metadata or {}), METADATA_KEY: raw_columns.to_json()}
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> RawRowsModel:
    """MLflow's pyfunc hook: ``path`` is the model's ``data`` directory."""
    import mlflow.pytorch
    from mlflow.models import Model

    root = os.path.dirname(os.path.abspath(path))
    meta = Model.load(os.path.join(root, "MLmodel")).metadata or {}
    return RawRowsModel(mlflow.pytorch._load_pyfunc(path, model_config),
                        OneHotEncoding.from_json(meta[METADATA_KEY]))


class RawRowsModel:
    """The pyfunc: a pandas DataFrame of raw columns in, the model's outputs (logits) out."""

    def __init__(self, inner: Any, raw_columns: OneHotEncoding) -> None:
        self.inner = inner
        self.raw_columns = raw_columns

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        if not isinstance(data, pd.DataFrame):
            raise TypeError(f"this model scores raw rows as a pandas DataFrame with columns "
                            f"{list(self.raw_columns.names)}; got {type(data).__name__}.")
        missing = [c for c in self.raw_columns.names if c not in data.columns]
        if missing:
            raise ValueError(f"column {missing[0]!r} is missing; the model takes "
                             f"{list(self.raw_columns.names)}.")
        categories = self.raw_columns.categories
        cols = [data[c].to_numpy(dtype=object) if c in categories else
                pd.to_numeric(data[c]).to_numpy(dtype="float32", na_value=float("nan"))
                for c in self.raw_columns.names]
        return self.inner.predict(self.raw_columns.encode(cols), params)

    def get_raw_model(self) -> Any:
        return self.inner.get_raw_model()

