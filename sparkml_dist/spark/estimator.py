"""``pyspark.ml`` stages: :class:`SparkMLDistEstimator` trains with :func:`sparkml_dist.fit`,
and the :class:`SparkMLDistModel` it returns scores with the project's batched Arrow UDF
(:func:`sparkml_dist.inference.predict_udf`).

Both are ordinary ``pyspark.ml`` stages: they go in a :class:`pyspark.ml.Pipeline` after a
``VectorAssembler`` (the features column may be an ML vector or an array of numbers) and save and
load with Spark ML persistence (``DefaultParamsWritable``/``DefaultParamsReadable``); saving refuses
params that hold a secret (a URI password, a secret-named override). A saved model holds no
weights: its params point at the MLflow model (``modelUri``) and run (``runId``) that
``fit`` logged, so loading it scores with exactly that model.

Params map onto the typed :class:`~sparkml_dist.config.JobConfig`: a YAML file (``config``),
then ``overrides`` (``"section.key=value"`` strings, any config key), then the typed params set
on the stage (``numWorkers`` -> ``training.num_workers``...; see :data:`CONFIG_PARAMS`). A typed
param and an override that give one key two values are refused.

Works on a classic session and through Spark Connect (the stages are pure Python; training and
scoring use DataFrame operations and an Arrow UDF only).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasFeaturesCol, HasLabelCol, HasPredictionCol, \
    HasProbabilityCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame

from sparkml_dist.config import JobConfig, load_config, parse_set
from sparkml_dist.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CONFIG_PARAMS: tuple[tuple[str, str, Callable[[Any], Any], str], ...] = (
    ("numWorkers", "training.num_workers", TypeConverters.toInt, "ranks (Spark barrier tasks)"),
    ("epochs", "training.epochs", TypeConverters.toInt, "passes over the training data"),
    ("batchSize", "training.batch_size", TypeConverters.toInt, "per-rank batch size"),
    ("seed", "training.seed", TypeConverters.toInt, "seed for split, shards, order and init"),
    ("optimizer", "optimizer.name", TypeConverters.toString, "sgd, adam or adamw"),
    ("learningRate", "optimizer.lr", TypeConverters.toFloat, "base learning rate"),
    ("modelFactory", "model.factory", TypeConverters.toString,
     "'package.module:function' returning a torch.nn.Module"),
    ("task", "data.task", TypeConverters.toString, "classification or regression"),
    ("valFraction", "data.val_fraction", TypeConverters.toFloat,
     "share of rows held out for validation"),
    ("scale", "data.scale", TypeConverters.toString, "none, standard or minmax"),
    ("backend", "backend.name", TypeConverters.toString, "torch or horovod"),
    ("device", "backend.device", TypeConverters.toString, "cpu or cuda"),
    ("strategy", "strategy.kind", TypeConverters.toString,
     "data_parallel, gossip, model_parallel or parameter_server (federated needs a client "
     "column; use fit())"),
    ("trackingUri", "tracking.tracking_uri", TypeConverters.toString, "MLflow tracking URI"),
    ("experiment", "tracking.experiment", TypeConverters.toString, "MLflow experiment name"),
    ("runName", "tracking.run_name", TypeConverters.toString, "MLflow run name"),
    ("progress", "tracking.progress", TypeConverters.toBoolean, "live progress on the driver"),
    ("maxRestarts", "fault.max_restarts", TypeConverters.toInt, "relaunches after a failure"),
)
"""``(param name, config key, type converter, doc)`` of the typed params of
:class:`SparkMLDistEstimator`."""


class _JobParams(Params):
    """The typed config params (added from :data:`CONFIG_PARAMS` below), a YAML config file
    and free-form overrides."""

    config: Param[str] = Param(Params._dummy(), "config",
                               "YAML job config file ('' for the defaults)",
                               typeConverter=TypeConverters.toString)
    overrides: Param[list[str]] = Param(
        Params._dummy(), "overrides",
        "config overrides as 'section.key=value' strings (values read as YAML), applied after "
        "the config file", typeConverter=TypeConverters.toListString)


for _name, _key, _conv, _doc in CONFIG_PARAMS:
    setattr(_JobParams, _name, Param(Params._dummy(), _name, f"{_doc} ({_key})",
                                     typeConverter=_conv))


class _ScoringParams(HasFeaturesCol, HasPredictionCol, HasProbabilityCol):
    """Columns the model reads and writes."""


class _WritableWithoutSecrets(DefaultParamsWritable):
    """Spark ML persistence that refuses to write a secret: params are saved as plain JSON, so a
    tracking URI's password or a secret-named override would land on disk readable by anyone
    who can read the path."""

    def write(self) -> Any:
        """The Spark ML writer, once no param holds a secret (else ConfigError naming it)."""
        from sparkml_dist.tracking.redact import DEFAULT_REDACTION_REGEX, redact_uri

        secret_key = re.compile(DEFAULT_REDACTION_REGEX)
        found = []
        for param in self.params:  # type: ignore[attr-defined]
            if not self.isDefined(param):  # type: ignore[attr-defined]
                continue
            value = self.getOrDefault(param)  # type: ignore[attr-defined]
            for text in value if isinstance(value, list) else [value]:
                if not isinstance(text, str):
                    continue
                key, _, rest = text.partition("=") if param.name == "overrides" else ("", "", text)
                if redact_uri(text) != text or (rest and secret_key.search(key)):
                    found.append(param.name)
        if found:
            raise ConfigError(
                f"{type(self).__name__} would save a secret in plain text (param "
                f"{found[0]!r}: a URI password or a secret-named override). Keep credentials out "
                "of the stage's params: set MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD in the environment, and pass read-option secrets "
                "through the job's YAML config (param 'config') instead.")
        return super().write()


class SparkMLDistEstimator(Estimator["SparkMLDistModel"], _JobParams, _ScoringParams,
                           HasLabelCol, DefaultParamsReadable["SparkMLDistEstimator"],
                           _WritableWithoutSecrets):
    """Train a PyTorch model across Spark barrier tasks (:func:`sparkml_dist.fit`); ``fit``
    returns a :class:`SparkMLDistModel` pointing at the logged MLflow model.

    ``featuresCol`` (default ``features``) is an ML vector (e.g. from ``VectorAssembler``) or an
    array of numbers; ``labelCol`` (default ``label``) a class or a number.

    Example::

        est = SparkMLDistEstimator(numWorkers=2, epochs=5, trackingUri="sqlite:///mlflow.db")
        model = Pipeline(stages=[VectorAssembler(inputCols=cols, outputCol="features"),
                                 est]).fit(df)
        model.transform(df).select("prediction", "probability")
    """

    @keyword_only
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._setDefault(featuresCol="features", labelCol="label", predictionCol="prediction",
                         probabilityCol="probability", config="", overrides=[])
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, **kwargs: Any) -> SparkMLDistEstimator:
        """Set any of the params by keyword (``numWorkers=2, epochs=3, ...``)."""
        return self._set(**self._input_kwargs)

    def job_config(self) -> JobConfig:
        """The :class:`JobConfig` this estimator trains with (config file, then overrides, then
        the typed params; features and label columns from ``featuresCol``/``labelCol``)."""
        path = self.getOrDefault(self.config) or None
        cfg = load_config(path)
        overrides = parse_set(list(self.getOrDefault(self.overrides)))
        for name, key, _, _ in CONFIG_PARAMS:
            param = self.getParam(name)
            if not self.isSet(param):
                continue
            value = self.getOrDefault(param)
            if key in overrides and overrides[key] != value:
                raise ConfigError(f"{name}={value!r} and overrides '{key}={overrides[key]}' set "
                                  f"{key} to two values; set it in one place.")
            overrides[key] = value
        if overrides.get("data.feature_cols", cfg.data.feature_cols):
            raise ConfigError("the estimator reads its features from featuresCol (an ML vector "
                              "or array column); data.feature_cols is set. Assemble the columns "
                              "with pyspark.ml.feature.VectorAssembler instead.")
        overrides["data.features_col"] = self.getFeaturesCol()
        overrides["data.label_col"] = self.getLabelCol()
        cfg = cfg.replace(**overrides)
        if not cfg.tracking.log_model:
            raise ConfigError("tracking.log_model is false, but the estimator's model scores with "
                              "the logged MLflow model; set tracking.log_model=true.")
        if cfg.strategy.kind == "federated":
            raise ConfigError("strategy.kind=federated trains on a client column and returns "
                              "no pyspark.ml model here; call sparkml_dist.fit() for it.")
        return cfg

    def _fit(self, dataset: DataFrame) -> SparkMLDistModel:
        from sparkml_dist.api import fit

        cfg = self.job_config()
        result = fit(dataset, cfg)
        assert result.model_uri is not None, "fit logs a model when tracking.log_model is true"
        log.info("trained run %s; model %s", result.run_id, result.model_uri)
        model = SparkMLDistModel(modelUri=result.model_uri, runId=result.run_id,
                                 trackingUri=result.tracking_uri,
                                 featuresCol=self.getFeaturesCol(),
                                 predictionCol=self.getPredictionCol(),
                                 probabilityCol=self.getProbabilityCol())
        model.metrics = dict(result.metrics)
        return model


class SparkMLDistModel(Model, _ScoringParams, DefaultParamsReadable["SparkMLDistModel"],
                       _WritableWithoutSecrets):
    """Scores ``featuresCol`` with an MLflow PyTorch model through the batched Arrow UDF.

    ``transform`` adds ``predictionCol`` (the label as trained: its original values for
    classification, a double for regression) and, for classification, ``probabilityCol``
    (softmax, an ML ``DenseVector``; set it to ``""`` to leave it out). Saved, it keeps only its
    params: the model URI, run id and tracking URI.
    """

    modelUri: Param[str] = Param(Params._dummy(), "modelUri",
                                 "MLflow model URI (models:/m-<id>, runs:/<run>/model, ...)",
                                 typeConverter=TypeConverters.toString)
    runId: Param[str] = Param(Params._dummy(), "runId", "MLflow run that trained the model",
                              typeConverter=TypeConverters.toString)
    trackingUri: Param[str] = Param(Params._dummy(), "trackingUri",
                                    "MLflow tracking URI where the model lives",
                                    typeConverter=TypeConverters.toString)
    batchSize: Param[int] = Param(Params._dummy(), "batchSize", "rows per forward pass",
                                  typeConverter=TypeConverters.toInt)
    allowPickle: Param[bool] = Param(
        Params._dummy(), "allowPickle",
        "false: refuse models saved with pickle (only torch.export archives load)",
        typeConverter=TypeConverters.toBoolean)

    @keyword_only
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._setDefault(featuresCol="features", predictionCol="prediction",
                         probabilityCol="probability", modelUri="", runId="", trackingUri="",
                         batchSize=1024, allowPickle=True)
        self._set(**self._input_kwargs)
        self.metrics: dict[str, float] = {}
        """Final metrics of the training run (empty on a loaded model)."""
        self._udf: tuple[tuple[Any, ...], Any] | None = None

    @keyword_only
    def setParams(self, **kwargs: Any) -> SparkMLDistModel:
        """Set any of the params by keyword."""
        return self._set(**self._input_kwargs)

    def predict_udf(self) -> Any:
        """The project's scoring UDF for this model (resolved once per param values)."""
        from sparkml_dist.inference import predict_udf

        uri = self.getOrDefault(self.modelUri)
        if not uri:
            raise ConfigError("SparkMLDistModel has no modelUri; get one from "
                              "SparkMLDistEstimator.fit or set modelUri= (e.g. models:/m-<id>).")
        key = (uri, self.getOrDefault(self.trackingUri), self.getOrDefault(self.batchSize),
               self.getOrDefault(self.allowPickle))
        if self._udf is None or self._udf[0] != key:
            self._udf = (key, predict_udf(uri, tracking_uri=key[1] or None, batch_size=key[2],
                                          allow_pickle=key[3]))
        return self._udf[1]

    def _transform(self, dataset: DataFrame) -> DataFrame:
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F

        from sparkml_dist.inference import PROBABILITY, feature_columns

        udf = self.predict_udf()
        spec = udf.spec
        outputs = {self.getPredictionCol(): F.col("__scored.prediction")}
        if spec.task == "classification" and self.getProbabilityCol():
            outputs[self.getProbabilityCol()] = array_to_vector(F.col(f"__scored.{PROBABILITY}"))
        clash = [c for c in outputs if c in dataset.columns]
        if clash:
            raise DataError(f"the input already has a column {clash[0]!r}; set predictionCol/"
                            "probabilityCol to another name or drop that column.")
        cols = feature_columns(dataset, spec, self.getFeaturesCol(), ())
        return (dataset.withColumn("__scored", udf(*cols))
                .select(*[F.col(f"`{c}`") for c in dataset.columns],
                        *[v.alias(k) for k, v in outputs.items()]))
