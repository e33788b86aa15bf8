"""Score Spark DataFrames with a PyTorch model from MLflow: a SQL-registrable Arrow UDF and a
batch scoring job.

The driver resolves the model once (:func:`resolve_model`): it reads the MLmodel file, checks the
input width from the signature and the classes from the metadata ``fit`` logs, and pins the model
to its artifact location (MLflow 3 logged models), so an alias that moves while a job runs cannot
mix two versions. The UDF (``Iterator[pa.Array] -> Iterator[pa.Array]``, Arrow in and out, no
pandas) loads the model once per Python worker (:func:`load_torch_model`'s cache) and runs it in
``batch_size`` slices.

Classification returns ``struct<prediction: <label type>, probability: array<float>>`` with the
label decoded back to the training values; regression returns ``struct<prediction: double>``. A row
with a null feature gets a null result, unless the model fills missing values itself (trained with
``data.on_invalid=fill``): then the null goes to it as NaN and the row is scored.

Trust: loading a model saved with pickle runs code from its artifacts on every executor, so a
model URI must come from a store and a writer you trust. ``allow_pickle=False`` refuses pickle
formats: only ``torch.export`` (``pt2``) archives load (what ``fit`` logs), and MLflow checks that
they hold tensors and plain data only (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` while the
executor loads the model).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sparkml_dist.config import _check
from sparkml_dist.errors import ConfigError, DataError
from sparkml_dist.tracking.redact import redact_uri

log = logging.getLogger(__name__)

Task = Literal["classification", "regression"]
PREDICTION = "prediction"
PROBABILITY = "probability"
_LOGGED_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]+)/?$")


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    """A batch scoring job: read ``source``, score it with ``model_uri``, write Parquet."""

    model_uri: str
    """``runs:/<run_id>/model``, ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or
    ``models:/m-<id>``."""
    tracking_uri: str | None = None
    """MLflow tracking (and registry) URI; default ``MLFLOW_TRACKING_URI`` or
    ``sqlite:///mlflow.db`` in cwd, as for training."""
    source: str
    """Table name or Parquet/CSV/JSON/ORC path to score."""
    format: Literal["parquet", "csv", "json", "orc", "table"] | None = None
    """Source format; inferred from the path's extension when unset, ``table`` for a name."""
    read_options: Mapping[str, str] = field(default_factory=dict)
    """Options for ``spark.read`` (CSV gets ``header`` and ``inferSchema`` by default)."""
    features_col: str | None = None
    """One array or ML vector column holding all features."""
    feature_cols: tuple[str, ...] = ()
    """Numeric feature columns, in training order (instead of ``features_col``)."""
    output: str
    """Parquet output directory."""
    mode: Literal["overwrite", "error"] = "error"
    """What to do when ``output`` exists: replace it, or fail."""
    batch_size: int = 1024
    """Rows per forward pass (at most Spark's Arrow batch, 10,000 rows by default)."""
    keep_cols: tuple[str, ...] | None = None
    """Input columns copied to the output next to the predictions; unset keeps them all."""
    task: Task | None = None
    """Override the task read from the model (needed only for models not logged by ``fit``)."""
    allow_pickle: bool = True
    """False: refuse models saved with pickle (they run code from the artifacts when loaded);
    only pickle-free ``torch.export`` archives load."""

    def __post_init__(self) -> None:
        _check(bool(self.model_uri), "model_uri must be set, e.g. runs:/<run_id>/model.")
        _check(bool(self.source) and bool(self.output), "source and output must both be set.")
        _check(bool(self.features_col) != bool(self.feature_cols),
               "set exactly one of features_col (an array column) or feature_cols (numeric "
               f"columns); got features_col={self.features_col!r}, "
               f"feature_cols={list(self.feature_cols)}.")
        _check(self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size}.")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What executors need to score with a model; resolved once on the driver."""

    uri: str
    """The URI as the user gave it (for messages)."""
    location: str
    """Pinned artifact location of the model directory."""
    tracking_uri: str
    in_features: int
    """Input width, from the model signature."""
    num_outputs: int
    task: Task
    classes: tuple[Any, ...] = ()
    """Label values by output index (classification); empty means the index is the label."""
    batch_size: int = 1024
    allow_pickle: bool = True
    """False: executors load the model with MLflow's pickle deserialization turned off."""
    fills_missing: bool = False
    """The model fills missing values itself (``data.on_invalid=fill``): a null feature goes to
    it as NaN, instead of giving a null result."""
    raw_columns: Any = None
    """A :class:`~sparkml_dist.preprocessing.OneHotEncoding` when the model was trained with
    ``data.categorical_cols``: it takes the named raw columns, string ones as vocabulary
    indices (mapped in Spark SQL before the UDF)."""

    def return_type(self) -> Any:
        """The Spark struct type the UDF returns."""
        from pyspark.sql import types as T

        if self.task == "regression":
            return T.StructType([T.StructField(PREDICTION, T.DoubleType())])
        return T.StructType([
            T.StructField(PREDICTION, _label_type(self.classes)),
            T.StructField(PROBABILITY, T.ArrayType(T.FloatType(), containsNull=False))])

    @property
    def output_names(self) -> tuple[str, ...]:
        return (PREDICTION,) if self.task == "regression" else (PREDICTION, PROBABILITY)


# ---------------------------------------------------------------------------------------------
# driver: resolve the model


def resolve_model(model_uri: str, *, tracking_uri: str | None = None, task: Task | None = None,
                  batch_size: int = 1024, allow_pickle: bool = True) -> ModelSpec:
    """Read ``model_uri``'s MLmodel and check it can be scored; pin it to its artifacts.
    ``allow_pickle=False`` refuses a model saved with pickle, here on the driver."""
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    from sparkml_dist.tracking.mlflow_store import default_tracking_uri

    _check(batch_size >= 1, f"batch_size must be >= 1; got {batch_size}.")
    _check(task in (None, "classification", "regression"),
           f"task must be 'classification', 'regression' or None; got {task!r}.")
    tracking = default_tracking_uri(tracking_uri)
    client = MlflowClient(tracking, registry_uri=tracking)
    try:
        match = _LOGGED_MODEL_URI.match(model_uri)
        root = client.get_logged_model(match.group(1)).artifact_location if match else model_uri
        model = Model.load(_download(f"{root.rstrip('/')}/MLmodel", tracking))
        if not match and model.model_id:
            root = client.get_logged_model(model.model_id).artifact_location
    except Exception as exc:  # noqa: BLE001 - MlflowException, OSError, bad URI schemes...
        raise ConfigError(redact_uri(  # the URIs, and MLflow's text quoting them, may hold a password
            f"cannot load model {model_uri!r} from the MLflow tracking store {tracking}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Check the run id, "
            "model name and version or alias, and pass tracking_uri= (or set "
            "MLFLOW_TRACKING_URI) if the model lives in another store.")) from None
    if "pytorch" not in model.flavors:
        raise ConfigError(f"model {model_uri!r} has flavors {', '.join(model.flavors)}; "
                          "sparkml_dist scores PyTorch models. Use mlflow.pyfunc.spark_udf for "
                          "other flavors.")
    if not allow_pickle:
        _check_pickle_free(model, root, tracking, model_uri)
    in_features, num_outputs = _signature_widths(model, model_uri)
    classes = tuple(json.loads((model.metadata or {}).get("classes", "[]")))
    resolved = _resolve_task(model_uri, task, classes, num_outputs)
    return ModelSpec(uri=model_uri, location=root, tracking_uri=tracking,
                     in_features=in_features, num_outputs=num_outputs or (len(classes) or 1),
                     task=resolved, classes=classes if resolved == "classification" else (),
                     batch_size=batch_size, allow_pickle=allow_pickle,
                     fills_missing=(model.metadata or {}).get("fills_missing") == "true",
                     raw_columns=_raw_columns(model.metadata or {}))


def _raw_columns(metadata: Mapping[str, Any]) -> Any:
    """The one-hot coding of a model logged with ``data.categorical_cols``, else None."""
    if "raw_columns" not in metadata:
        return None
    from sparkml_dist.preprocessing import OneHotEncoding

    return OneHotEncoding.from_json(metadata["raw_columns"])


PT2_FILE = "model.pt2"
"""The file of a ``torch.export`` archive in an MLflow PyTorch model's data directory."""


def _check_pickle_free(model: Any, root: str, tracking_uri: str, uri: str) -> None:
    """Refuse a model whose data is not a ``torch.export`` archive (pickle formats run code)."""
    import mlflow.artifacts

    data = model.flavors["pytorch"].get("model_data", "data")
    names = {a.path.rsplit("/", 1)[-1] for a in mlflow.artifacts.list_artifacts(
        artifact_uri=f"{root.rstrip('/')}/{data}", tracking_uri=tracking_uri)}
    if PT2_FILE not in names:
        raise ConfigError(f"model {uri!r} is saved with pickle ({', '.join(sorted(names))}), "
                          "which runs code from its artifacts when loaded; allow_pickle=False "
                          "refuses it. Log it with mlflow.pytorch.log_model(..., "
                          "serialization_format='pt2') (what fit does), or pass "
                          "allow_pickle=True if you trust the model's source.")


def _download(uri: str, tracking_uri: str, dst: str | None = None) -> str:
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst,
                                               tracking_uri=tracking_uri,
                                               registry_uri=tracking_uri)


def _signature_widths(model: Any, uri: str) -> tuple[int, int | None]:
    """(input width, output width or None) from a tensor or column signature."""
    sig = model.signature
    if sig is None or sig.inputs is None:
        raise ConfigError(f"model {uri!r} has no signature, so its input width is unknown. Log "
                          "it with signature=infer_signature(features, outputs) (fit does).")

    def width(schema: Any) -> int | None:
        if not schema.is_tensor_spec():
            return len(schema.inputs)
        shape = schema.inputs[0].shape
        return 1 if len(shape) == 1 else shape[-1] if len(shape) == 2 and shape[-1] > 0 else None

    d = width(sig.inputs)
    if d is None:
        raise ConfigError(f"model {uri!r} takes input of shape {sig.inputs.inputs[0].shape}; "
                          "sparkml_dist scores models whose input is (rows, features).")
    return d, width(sig.outputs) if sig.outputs is not None else None


def _resolve_task(uri: str, task: Task | None, classes: tuple[Any, ...],
                  num_outputs: int | None) -> Task:
    if task is None:
        task = "classification" if classes or (num_outputs or 1) > 1 else "regression"
    if task == "regression":
        _check(num_outputs in (None, 1),
               f"model {uri!r} has {num_outputs} outputs; task=regression needs exactly 1.")
    else:
        _check(num_outputs is None or num_outputs >= 2,
               f"model {uri!r} has 1 output; task=classification needs one logit per class.")
        _check(not classes or num_outputs in (None, len(classes)),
               f"model {uri!r} has {num_outputs} outputs but {len(classes)} classes in its "
               "metadata.")
    return task


def _label_kind(classes: tuple[Any, ...]) -> str:
    """Spark type name of decoded labels (the JSON metadata keeps int/float/str/bool apart)."""
    if all(isinstance(c, bool) for c in classes) and classes:
        return "boolean"
    if all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return "long"  # also the class index when the model has no classes
    if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in classes):
        return "double"
    return "string"


def _label_type(classes: tuple[Any, ...]) -> Any:
    from pyspark.sql import types as T

    return {"boolean": T.BooleanType(), "long": T.LongType(), "double": T.DoubleType(),
            "string": T.StringType()}[_label_kind(classes)]


def _classes_array(classes: tuple[Any, ...]) -> pa.Array:
    kind = _label_kind(classes)
    if kind == "string":
        return pa.array([str(c) for c in classes], pa.string())
    return pa.array(list(classes), {"boolean": pa.bool_(), "long": pa.int64(),
                                    "double": pa.float64()}[kind])


# ---------------------------------------------------------------------------------------------
# executors: load once per Python worker, score Arrow batches

_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def load_torch_model(location: str, tracking_uri: str, allow_pickle: bool = True) -> Any:
    """The model at ``location``, loaded once per process (keyed by location, tracking URI and
    ``allow_pickle``; False loads with MLflow's pickle deserialization turned off)."""
    key = (location, tracking_uri, allow_pickle)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            if allow_pickle:
                model = _load(location, tracking_uri)
            else:
                model = _without_pickle(lambda: _load(location, tracking_uri))
            _MODELS[key] = model
    return model


_NO_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def _without_pickle(load: Callable[[], Any]) -> Any:
    """Run ``load`` with MLflow's pickle deserialization off (read at load time; restored)."""
    import os

    previous = os.environ.get(_NO_PICKLE_ENV)
    os.environ[_NO_PICKLE_ENV] = "false"
    try:
        return load()
    finally:
        if previous is None:
            os.environ.pop(_NO_PICKLE_ENV, None)
        else:
            os.environ[_NO_PICKLE_ENV] = previous


def _load(location: str, tracking_uri: str) -> Any:
    import shutil
    import tempfile
    from urllib.parse import urlparse

    import mlflow.pytorch

    if urlparse(location).scheme in ("", "file"):
        model = mlflow.pytorch.load_model(location)
    else:  # remote artifacts: download to a temporary directory, load, delete the copy
        tmp = tempfile.mkdtemp(prefix="sparkml_dist-model-")
        try:
            model = mlflow.pytorch.load_model(_download(location, tracking_uri, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.eval()
    except NotImplementedError:  # a torch.export program (MLflow's default "pt2" format) is
        pass                     # traced in the mode it was logged in (eval, by fit)
    log.info("loaded model %s", location)
    return model


def feature_matrix(columns: Sequence[pa.Array], in_features: int, uri: str = "the model",
                   missing_as_nan: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Features of the rows without nulls as float32 ``(rows, in_features)``, and the mask of
    those rows (None when every row is complete). ``missing_as_nan``: null feature values become
    NaN and their rows are kept (for a model that fills them); a null array is still a null row.

    ``columns`` is one array column of width ``in_features``, or ``in_features`` numeric columns.
    """
    from_list = len(columns) == 1 and _is_list(columns[0].type)
    if from_list:
        arr = columns[0]
        valid = arr.is_valid()
        widths = pc.list_value_length(arr).filter(valid).to_numpy(zero_copy_only=False)
        bad = widths != in_features
        if bad.any():
            raise DataError(f"a feature array has {int(widths[bad][0])} values, but {uri} "
                            f"expects {in_features} (the input width of its signature). Score "
                            "rows shaped like the training data's features.")
        values = pc.list_flatten(arr)
        if not _is_numeric(values.type):
            raise DataError(f"feature arrays hold {values.type}; expected numbers.")
        if values.null_count and not missing_as_nan:
            raise DataError(f"{values.null_count} feature values are null inside arrays; fill or "
                            "filter them before scoring.")
        x = _as_float32(values).reshape(-1, in_features)
    else:
        for c in columns:
            if not _is_numeric(c.type):
                raise DataError(f"a feature column holds {c.type}; expected one array column or "
                                f"{in_features} numeric columns. ML vectors: convert with "
                                "pyspark.ml.functions.vector_to_array.")
        if len(columns) != in_features:
            raise DataError(f"got {len(columns)} numeric feature columns, but {uri} expects "
                            f"{in_features} (the input width of its signature).")
        valid = np.logical_and.reduce([c.is_valid().to_numpy(zero_copy_only=False)
                                       for c in columns]) | missing_as_nan
        x = np.column_stack([_as_float32(c) for c in columns])  # a null becomes NaN
    mask = valid if isinstance(valid, np.ndarray) else valid.to_numpy(zero_copy_only=False)
    if mask.all():
        return x, None
    return (x if from_list else x[mask]), mask  # list_flatten already skipped null lists


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _as_float32(arr: pa.Array) -> np.ndarray:
    x = pc.cast(arr, pa.float32(), safe=False).to_numpy(zero_copy_only=False)
    return x if x.flags.writeable else x.copy()  # torch.from_numpy wants a writable buffer


def task_device() -> Any:
    """The GPU Spark assigned to this task (``spark.task.resource.gpu.amount``), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        gpus = ctx.resources().get("gpu") if ctx is not None else None
    except Exception:  # noqa: BLE001 - outside a Spark task
        gpus = None
    if gpus is None or not gpus.addresses:
        return torch.device("cpu")
    return torch.device("cuda", int(gpus.addresses[0]))


def model_on(model: Any, device: Any, probe: np.ndarray | None = None) -> tuple[Any, Any]:
    """``(model, device)``: ``model`` on ``device`` and the device its inputs must go to. Falls
    back to the CPU, with a warning, when the model cannot move there (a torch.export program
    keeps the device it was traced on) or when its first forward there, on the first rows of
    ``probe``, fails (running out of GPU memory is raised instead)."""
    import torch

    cpu = torch.device("cpu")
    if device.type == "cpu" or not hasattr(model, "to"):
        return model, cpu
    try:
        moved = model.to(device)
        if probe is not None and len(probe):  # a few rows: some models refuse a batch of 1
            with torch.inference_mode():
                moved(torch.from_numpy(np.array(probe[:8], dtype=np.float32)).to(device))
        return moved, device
    except torch.cuda.OutOfMemoryError:
        raise  # a full GPU is not the model's fault: the task fails and Spark retries it
    except Exception as exc:  # noqa: BLE001 - any failure there: score where the model came from
        log.warning("the model cannot run on %s (%s); scoring on the CPU", device, exc)
        try:
            return model.to(cpu), cpu
        except Exception:  # noqa: BLE001 - it never left the CPU
            return model, cpu


def forward(model: Any, x: np.ndarray, batch_size: int, num_outputs: int,
            softmax: bool, device: Any = None) -> np.ndarray:
    """Model outputs for ``x`` in slices of ``batch_size`` rows (softmax of logits if asked).

    On a GPU the whole Arrow batch (at most ``spark.sql.execution.arrow.maxRecordsPerBatch``
    rows) goes through in one pass: the GPU is fed large slices, and only the outputs come back.
    If that runs out of GPU memory the slices are halved, down to ``batch_size`` rows.
    """
    import torch

    if len(x) == 0:
        return np.empty((0, num_outputs), np.float32)
    on_gpu = device is not None and device.type == "cuda"
    step = len(x) if on_gpu else batch_size
    while True:
        try:
            with torch.inference_mode():
                outs = [model(torch.from_numpy(x[i:i + step]).to(device) if on_gpu else
                              torch.from_numpy(x[i:i + step])) for i in range(0, len(x), step)]
                y = torch.cat(outs) if len(outs) > 1 else outs[0]
                if softmax:
                    y = torch.softmax(y, dim=1)
                return y.reshape(len(x), -1).float().cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            if not on_gpu or step <= batch_size:
                raise
            outs = y = None  # type: ignore[assignment]
            torch.cuda.empty_cache()
            step = max(batch_size, step // 2)
            log.warning("out of GPU memory scoring %d rows at once; trying %d", len(x), step)


def result_array(spec: ModelSpec, y: np.ndarray, classes: pa.Array | None) -> pa.StructArray:
    """The UDF's struct column for model outputs ``y`` (probabilities when classifying)."""
    if spec.task == "regression":
        return pa.StructArray.from_arrays([pa.array(y[:, 0].astype(np.float64))], [PREDICTION])
    idx = pa.array(y.argmax(axis=1).astype(np.int64))
    labels = classes.take(idx) if classes is not None else idx
    n, k = y.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    probs = pa.ListArray.from_arrays(offsets, pa.array(y.reshape(-1)),
                                     type=pa.list_(pa.field("element", pa.float32(), False)))
    return pa.StructArray.from_arrays([labels, probs], [PREDICTION, PROBABILITY])


def score_batches(spec: ModelSpec, batches: Iterator[Any]) -> Iterator[pa.Array]:
    """The UDF body: one result array per incoming Arrow batch (an array or a tuple of them)."""
    model = device = None
    classes = _classes_array(spec.classes) if spec.classes else None
    for batch in batches:
        cols = batch if isinstance(batch, tuple) else (batch,)
        x, mask = feature_matrix(cols, spec.in_features, repr(spec.uri), spec.fills_missing)
        if model is None:  # after the first batch passed its checks: bad data fails fast
            model, device = model_on(load_torch_model(spec.location, spec.tracking_uri,
                                                      spec.allow_pickle), task_device(), x)
        y = forward(model, x, spec.batch_size, spec.num_outputs, spec.task == "classification",
                    device)
        out = result_array(spec, y, classes)
        if mask is not None:  # null feature rows -> null results (take with null indices)
            out = out.take(pa.array(np.cumsum(mask) - 1, mask=~mask))
        yield out


# ---------------------------------------------------------------------------------------------
# driver: the public API


def _spark_udf(spec: ModelSpec) -> Any:
    from pyspark.sql.functions import arrow_udf

    def predict(batches: Iterator[tuple[pa.Array, ...]]) -> Iterator[pa.Array]:
        return score_batches(spec, batches)

    return arrow_udf(predict, spec.return_type())


def predict_udf(model_uri: str, *, tracking_uri: str | None = None, batch_size: int = 1024,
                task: Task | None = None, allow_pickle: bool = True) -> Callable[..., Any]:
    """A Spark UDF scoring rows with the PyTorch model at ``model_uri``.

    Call it with one array column (``predict("features")``) or with the model's numeric feature
    columns in training order (``predict("a", "b", "c")``). It returns a struct: ``prediction``
    (the original label) and ``probability`` (softmax, ``array<float>``) for classification,
    ``prediction`` (double) for regression. Works with classic Spark and Spark Connect.

    Args:
        model_uri: ``runs:/<run>/model``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``
            or ``models:/m-<id>``; resolved and pinned now, on the driver.
        tracking_uri: where the model lives; executors use it too (default as for training).
        batch_size: rows per forward pass.
        task: override the task read from the model's metadata.
        allow_pickle: False refuses models saved with pickle, which run code from the model's
            artifacts on every executor; only pickle-free ``torch.export`` archives load. With
            True, the model URI must come from a source you trust.
    """
    spec = resolve_model(model_uri, tracking_uri=tracking_uri, task=task, batch_size=batch_size,
                         allow_pickle=allow_pickle)
    raw = _spark_udf(spec)

    def predict(*cols: Any) -> Any:
        if len(cols) not in (1, spec.in_features):
            raise DataError(f"got {len(cols)} feature columns, but model {spec.uri!r} expects "
                            f"{spec.in_features} features: pass one array column or "
                            f"{spec.in_features} numeric columns.")
        return raw(*(_coded(spec, cols) if spec.raw_columns is not None else cols))

    predict.__dict__.update(raw.__dict__)  # func, evalType...: spark.udf.register accepts it
    predict.spec = spec  # type: ignore[attr-defined]
    return predict


def _coded(spec: ModelSpec, cols: Sequence[Any]) -> list[Any]:
    """The raw columns of a model with one-hot columns, string ones as vocabulary indices."""
    from pyspark.sql import functions as F

    from sparkml_dist.spark.prepare import category_index

    enc = spec.raw_columns
    if len(cols) != len(enc.names):
        raise DataError(f"model {spec.uri!r} takes its raw columns ({', '.join(enc.names)}), "
                        f"one argument each; got {len(cols)} column(s).")
    k = len(enc.numeric_cols)
    out = list(cols)
    for j, (_, vocab) in enumerate(enc.categorical):
        col = cols[k + j]
        out[k + j] = category_index(F.col(col) if isinstance(col, str) else col, vocab)
    return out


def register_predict_udf(spark: Any, name: str, model_uri: str, *,
                         tracking_uri: str | None = None, batch_size: int = 1024,
                         task: Task | None = None, allow_pickle: bool = True
                         ) -> Callable[..., Any]:
    """Register :func:`predict_udf` as SQL function ``name``: ``SELECT name(features) FROM t``."""
    udf = predict_udf(model_uri, tracking_uri=tracking_uri, batch_size=batch_size, task=task,
                      allow_pickle=allow_pickle)
    spark.udf.register(name, udf)
    return udf


def feature_columns(df: Any, spec: ModelSpec, features_col: str | None,
                    feature_cols: Sequence[str]) -> list[Any]:
    """Check the feature columns against ``df``'s schema and the model; return them as Columns."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in df.schema.fields}
    wanted = ([features_col] if features_col else []) + list(feature_cols)
    if not wanted or (features_col and feature_cols):
        raise ConfigError("set exactly one of features_col (an array or vector column) or "
                          f"feature_cols (numeric columns); columns are: {', '.join(fields)}.")
    missing = [c for c in wanted if c not in fields]
    if missing:
        raise DataError(f"feature column {missing[0]!r} not found; columns are: "
                        f"{', '.join(fields)}. Set features_col or feature_cols.")
    if features_col:
        dtype = fields[features_col]
        if type(dtype).__name__ == "VectorUDT":
            from pyspark.ml.functions import vector_to_array

            return [vector_to_array(F.col(features_col), "float32")]
        if not (isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, T.NumericType)):
            raise DataError(f"features_col {features_col!r} has type {dtype.simpleString()}; "
                            "expected an array of numbers or an ML vector.")
        return [F.col(features_col)]
    categorical = spec.raw_columns.categories if spec.raw_columns is not None else {}
    not_numeric = [c for c in feature_cols
                   if not isinstance(fields[c], T.NumericType) and c not in categorical]
    if not_numeric:
        raise DataError(f"feature column {not_numeric[0]!r} has type "
                        f"{fields[not_numeric[0]].simpleString()}; feature_cols must be numeric.")
    if len(feature_cols) != spec.in_features:
        raise DataError(f"got {len(feature_cols)} feature columns ({', '.join(feature_cols)}), "
                        f"but model {spec.uri!r} expects {spec.in_features} features (its "
                        "signature). List the training features in order, or pass one array "
                        "column as features_col.")
    return [F.col(c) for c in feature_cols]


def predict(df: Any, model_uri: str, *, features_col: str | None = None,
            feature_cols: Sequence[str] = (), tracking_uri: str | None = None,
            batch_size: int = 1024, task: Task | None = None,
            keep_cols: Sequence[str] | None = None, allow_pickle: bool = True) -> Any:
    """``df``'s ``keep_cols`` (default: all) plus ``prediction`` (and ``probability``) columns,
    with the feature columns checked on the driver before any job runs (``allow_pickle`` as for
    :func:`predict_udf`)."""
    udf = predict_udf(model_uri, tracking_uri=tracking_uri, batch_size=batch_size, task=task,
                      allow_pickle=allow_pickle)
    spec: ModelSpec = udf.spec  # type: ignore[attr-defined]
    cols = feature_columns(df, spec, features_col, feature_cols)
    keep = list(df.columns if keep_cols is None else keep_cols)
    missing = [c for c in keep if c not in df.columns]
    if missing:
        raise DataError(f"keep_cols: column {missing[0]!r} not found; columns are: "
                        f"{', '.join(df.columns)}.")
    clash = [c for c in keep if c in spec.output_names]
    if clash:
        raise DataError(f"the input already has a column {clash[0]!r}; leave it out of "
                        "keep_cols (or rename it) so the predictions can take that name.")
    return (df.select(*keep, udf(*cols).alias("__scored"))
            .select(*keep, *[f"__scored.{n}" for n in spec.output_names]))


@dataclass(frozen=True)
class BatchPrediction:
    """What :func:`run_prediction` wrote."""

    output: str
    rows: int
    model_uri: str


def run_prediction(cfg: PredictConfig, spark: Any = None) -> BatchPrediction:
    """Score ``cfg.source`` with ``cfg.model_uri`` and write Parquet to ``cfg.output``."""
    from pyspark.sql import SparkSession

    from sparkml_dist.config import DataConfig
    from sparkml_dist.spark.prepare import read_source

    spark = spark or SparkSession.builder.getOrCreate()
    df = read_source(spark, DataConfig(source=cfg.source, format=cfg.format,
                                       read_options=cfg.read_options))
    scored = predict(df, cfg.model_uri, features_col=cfg.features_col,
                     feature_cols=cfg.feature_cols, tracking_uri=cfg.tracking_uri,
                     batch_size=cfg.batch_size, task=cfg.task, keep_cols=cfg.keep_cols,
                     allow_pickle=cfg.allow_pickle)
    scored.write.mode(cfg.mode).parquet(cfg.output)
    rows = spark.read.parquet(cfg.output).count()
    log.info("wrote %d predictions of %s to %s", rows, redact_uri(cfg.model_uri),
             redact_uri(cfg.output))
    return BatchPrediction(output=cfg.output, rows=rows, model_uri=cfg.model_uri)
