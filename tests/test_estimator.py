"""The ``pyspark.ml`` Estimator and Model on real local Spark with a real MLflow store: params
map onto the typed config; a Pipeline with a Spark ``VectorAssembler`` fits, transforms (the
same predictions and probabilities as the project's UDF on the same rows), saves, loads and
transforms again identically (through Spark Connect: tests/test_estimator_connect.py)."""

from __future__ import annotations

import numpy as np
import pytest

from sparkml_dist.errors import ConfigError
from sparkml_dist.spark.estimator import CONFIG_PARAMS, SparkMLDistEstimator, SparkMLDistModel

COLS = ["a", "b", "c", "d"]
CLASSES = ["high", "low", "mid"]


def make_rows(n: int = 240, seed: int = 0) -> list[tuple]:
    """Three string classes, learnable from four numeric columns."""
    rng = np.random.default_rng(seed)
    centers = np.array([[2.0, 0.0, 1.0, -1.0], [-2.0, 1.0, 0.0, 1.0], [0.0, -2.0, -1.0, 0.0]])
    y = rng.integers(0, 3, size=n)
    x = centers[y] + 0.5 * rng.normal(size=(n, 4))
    return [tuple(float(v) for v in r) + (CLASSES[t],) for r, t in zip(x, y)]


def estimator(tracking_uri: str) -> SparkMLDistEstimator:
    return SparkMLDistEstimator(
        labelCol="kind", numWorkers=2, epochs=3, batchSize=16, learningRate=0.05, seed=1,
        trackingUri=tracking_uri, progress=False, maxRestarts=0,
        overrides=["model.kwargs={hidden: [16]}"])


def test_params_map_onto_the_typed_config(tmp_path):
    conf = tmp_path / "job.yaml"
    conf.write_text("training:\n  epochs: 7\n  num_workers: 3\noptimizer:\n  name: sgd\n")
    est = SparkMLDistEstimator(config=str(conf), featuresCol="vec", labelCol="y", epochs=2,
                               learningRate=0.5, overrides=["training.batch_size=8"])
    cfg = est.job_config()
    assert (cfg.training.epochs, cfg.training.num_workers, cfg.training.batch_size) == (2, 3, 8)
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("sgd", 0.5)
    assert (cfg.data.features_col, cfg.data.label_col, cfg.data.feature_cols) == ("vec", "y", ())
    # Every typed param reaches its key.
    assert {name for name, *_ in CONFIG_PARAMS} <= {p.name for p in est.params}
    assert SparkMLDistEstimator(numWorkers=4, strategy="gossip").job_config().strategy.kind \
        == "gossip"
    with pytest.raises(TypeError):  # the type converter refuses a non-integer
        SparkMLDistEstimator(epochs="three")
    with pytest.raises(ConfigError, match="two values"):
        SparkMLDistEstimator(epochs=2, overrides=["training.epochs=3"]).job_config()
    with pytest.raises(ConfigError, match="training.epochs must be >= 1"):
        SparkMLDistEstimator(epochs=0).job_config()
    with pytest.raises(ConfigError, match="VectorAssembler"):
        SparkMLDistEstimator(overrides=["data.feature_cols=[a, b]"]).job_config()
    with pytest.raises(ConfigError, match="log_model"):
        SparkMLDistEstimator(overrides=["tracking.log_model=false"]).job_config()


def test_estimator_saves_and_loads_its_params(spark, tmp_path):
    est = SparkMLDistEstimator(epochs=4, learningRate=0.01, overrides=["data.split=random"])
    est.save(str(tmp_path / "est"))
    back = SparkMLDistEstimator.load(str(tmp_path / "est"))
    assert back.uid == est.uid and back.job_config() == est.job_config()


@pytest.mark.parametrize("params", [
    {"trackingUri": "http://alice:hunter2pw@mlflow.example:5000"},
    {"overrides": ["training.epochs=2", "data.read_options.password=hunter2pw"]},
])
def test_saving_refuses_params_that_hold_a_secret(spark, tmp_path, params):
    for stage in (SparkMLDistEstimator(**params),
                  SparkMLDistModel(modelUri="models:/m-1", trackingUri=params.get(
                      "trackingUri", "http://bob:hunter2pw@h:5000"))):
        with pytest.raises(ConfigError, match=r"would save a secret in plain text .*"
                                              r"MLFLOW_TRACKING_PASSWORD"):
            stage.save(str(tmp_path / "stage"))
        assert not (tmp_path / "stage").exists()
    SparkMLDistEstimator(overrides=["data.read_options.user=alice"]).save(str(tmp_path / "ok"))


def _scores(df, cols=("prediction", "probability")):
    rows = df.orderBy("id").collect()
    return ([r[cols[0]] for r in rows], np.array([r[cols[1]].toArray() for r in rows]))


def test_pipeline_with_vector_assembler_fits_transforms_saves_loads(spark, tracking_uri,
                                                                    tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import VectorAssembler

    from sparkml_dist.inference import predict_udf

    df = spark.createDataFrame([(i, *r) for i, r in enumerate(make_rows())],
                               ["id", *COLS, "kind"])
    pipeline = Pipeline(stages=[VectorAssembler(inputCols=COLS, outputCol="features"),
                                estimator(tracking_uri)])
    fitted = pipeline.fit(df)
    model = fitted.stages[-1]
    assert isinstance(model, SparkMLDistModel) and model.getOrDefault("runId")
    assert model.metrics["val/accuracy"] > 0.8  # it learned

    out = fitted.transform(df)
    assert out.columns == ["id", *COLS, "kind", "features", "prediction", "probability"]
    preds, probs = _scores(out)
    assert set(preds) <= set(CLASSES)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    # The project's UDF on the same rows, fed the raw columns: the same scores exactly.
    udf = predict_udf(model.getOrDefault("modelUri"), tracking_uri=tracking_uri)
    direct = df.select("id", udf(*COLS).alias("s")).orderBy("id").collect()
    assert preds == [r["s"]["prediction"] for r in direct]
    assert np.array_equal(probs, np.array([r["s"]["probability"] for r in direct],
                                          dtype=np.float32).astype(np.float64))
    labels = [r["kind"] for r in df.orderBy("id").collect()]
    assert np.mean([p == t for p, t in zip(preds, labels)]) > 0.8

    path = str(tmp_path / "pipeline_model")
    fitted.save(path)
    loaded = PipelineModel.load(path)
    again = loaded.stages[-1]
    assert isinstance(again, SparkMLDistModel)
    assert {k: again.getOrDefault(k) for k in ("modelUri", "runId", "trackingUri")} == \
        {k: model.getOrDefault(k) for k in ("modelUri", "runId", "trackingUri")}
    preds2, probs2 = _scores(loaded.transform(df))
    assert preds2 == preds and np.array_equal(probs2, probs)

    # The unfitted pipeline round-trips too, and the model alone with a renamed output.
    pipeline.save(str(tmp_path / "pipeline"))
    assert isinstance(Pipeline.load(str(tmp_path / "pipeline")).getStages()[-1],
                      SparkMLDistEstimator)
    renamed = again.copy({again.predictionCol: "label_hat", again.probabilityCol: ""})
    assembled = fitted.stages[0].transform(df)
    only = renamed.transform(assembled).orderBy("id").collect()
    assert [r["label_hat"] for r in only] == preds and "probability" not in only[0]
    with pytest.raises(Exception, match="already has a column 'prediction'"):
        again.transform(out.drop("probability"))

