"""Scoring with models from MLflow: the Arrow UDF, SQL registration, the batch job, bad input.

One small digits model is trained (2 epochs) and registered once for the module; a tiny
regression model is saved with ``mlflow.pytorch`` directly (no training) for the numeric-columns
and null paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F

from sparkml_dist import fit
from sparkml_dist.config import load_dataclass
from sparkml_dist.datasets import digits_table
from sparkml_dist.errors import ConfigError, DataError
from sparkml_dist.inference import (
    ModelSpec, PredictConfig, feature_matrix, predict, predict_udf, register_predict_udf,
    resolve_model, result_array)
from tests.conftest import sqlite_store

REPO = Path(__file__).resolve().parents[1]
NAME = "digits_inference_test"
PROB_ATOL = 1e-5


def _torch_model(model_uri: str, tracking_uri: str) -> torch.nn.Module:
    local = mlflow.artifacts.download_artifacts(model_uri, tracking_uri=tracking_uri)
    return mlflow.pytorch.load_model(local)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One embedded MLflow store (SQLite + local artifacts) shared by the module's models."""
    return sqlite_store(tmp_path_factory.mktemp('mlflow') / "mlflow.db")


@pytest.fixture(scope="module")
def scoring_path(tmp_path_factory) -> Path:
    """The digits plus an ``id`` column, so rows can be matched across jobs."""
    table = digits_table()
    table = table.append_column("id", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    path = tmp_path_factory.mktemp("score") / "digits_ids.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def digits(spark, scoring_path):
    return spark.read.parquet(str(scoring_path))


@pytest.fixture(scope="module")
def trained(spark, digits, store):
    """The module's one trained model, registered as version 1 with alias ``champion``."""
    res = fit(digits.drop("id"), **{
        "data.features_col": "features", "model.kwargs": {"hidden": [32]},
        "training.epochs": 2, "training.num_workers": 2, "training.batch_size": 64,
        "tracking.tracking_uri": store, "tracking.progress": False,
        "tracking.registered_model_name": NAME})
    MlflowClient(store).set_registered_model_alias(NAME, "champion", "1")
    return res


@pytest.fixture(scope="module")
def udf_rows(trained, digits):
    """id -> (prediction, probabilities) from the UDF, the reference for the other paths."""
    udf = predict_udf(trained.model_uri, tracking_uri=trained.tracking_uri, batch_size=100)
    rows = digits.select("id", udf("features").alias("p")).collect()
    return {r["id"]: (r["p"]["prediction"], np.asarray(r["p"]["probability"])) for r in rows}


@pytest.fixture(scope="module")
def regression_uri(store, tmp_path_factory) -> str:
    """A 3-feature linear regression saved as a plain run artifact (no logged-model id)."""
    from mlflow.models import infer_signature

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).eval()
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    path = tmp_path_factory.mktemp("reg") / "model"
    with torch.no_grad():
        sig = infer_signature(x, model(torch.from_numpy(x)).numpy())
    mlflow.pytorch.save_model(model, path, signature=sig, input_example=x,
                              metadata={"classes": "[]"}, pip_requirements=["torch"])
    client = MlflowClient(store)
    artifacts = (tmp_path_factory.mktemp("reg-artifacts")).as_uri()  # not ./mlruns in cwd
    run = client.create_run(client.create_experiment("inference-test", artifacts))
    client.log_artifacts(run.info.run_id, str(path), "model")
    client.set_terminated(run.info.run_id)
    return f"runs:/{run.info.run_id}/model"


# ---------------------------------------------------------------------------------------------
# (a) the UDF against mlflow.pyfunc.spark_udf and plain PyTorch


def test_udf_matches_pyfunc_and_torch(spark, trained, digits, udf_rows):
    assert trained.model_uri.startswith("models:/m-")
    mlflow.set_tracking_uri(trained.tracking_uri)
    pyfunc = mlflow.pyfunc.spark_udf(spark, trained.model_uri, result_type="array<float>",
                                     env_manager="local")
    rows = digits.select("id", "features", pyfunc("features").alias("logits")).collect()
    assert len(rows) == len(udf_rows) == 1797
    model = _torch_model(trained.model_uri, trained.tracking_uri)
    x = np.asarray([r["features"] for r in rows], dtype=np.float32)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    ours = [udf_rows[r["id"]] for r in rows]
    np.testing.assert_array_equal([p for p, _ in ours],
                                  [int(np.argmax(r["logits"])) for r in rows])
    np.testing.assert_allclose(np.stack([q for _, q in ours]), probs, atol=PROB_ATOL, rtol=0)
    np.testing.assert_array_equal([p for p, _ in ours], probs.argmax(axis=1))
    # the labels are decoded back to the training labels' values and type (bigint)
    spec = resolve_model(trained.model_uri, tracking_uri=trained.tracking_uri)
    assert spec.return_type().simpleString() == \
        "struct<prediction:bigint,probability:array<float>>"


# ---------------------------------------------------------------------------------------------
# (b) SQL and (e) registry URIs


def test_sql_registered_function(spark, trained, digits, udf_rows):
    register_predict_udf(spark, "predict_digit", f"models:/{NAME}@champion",
                         tracking_uri=trained.tracking_uri)
    digits.createOrReplaceTempView("digits_scored_by_sql")
    rows = spark.sql("SELECT id, predict_digit(features).prediction AS p, "
                     "predict_digit(features).probability AS q "
                     "FROM digits_scored_by_sql WHERE id < 200").collect()
    assert len(rows) == 200
    assert all(r["p"] == udf_rows[r["id"]][0] for r in rows)
    np.testing.assert_allclose(np.stack([r["q"] for r in rows]),
                               np.stack([udf_rows[r["id"]][1] for r in rows]), atol=PROB_ATOL)


def test_registry_uris_resolve_to_the_same_model(trained, digits, udf_rows):
    client = MlflowClient(trained.tracking_uri)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    uris = [trained.model_uri, f"models:/{NAME}/1", f"models:/{NAME}@champion",
            f"runs:/{trained.run_id}/model"]
    specs = [resolve_model(u, tracking_uri=trained.tracking_uri) for u in uris]
    assert len({s.location for s in specs}) == 1  # pinned to one artifact location
    assert {(s.in_features, s.num_outputs, s.task, s.classes) for s in specs} == {
        (64, 10, "classification", tuple(range(10)))}
    udfs = [predict_udf(u, tracking_uri=trained.tracking_uri) for u in uris[1:]]
    rows = (digits.where(F.col("id") < 50)
            .select("id", *[u("features").prediction.alias(f"p{i}") for i, u in enumerate(udfs)])
            .collect())
    assert len(rows) == 50
    for r in rows:
        assert r["p0"] == r["p1"] == r["p2"] == udf_rows[r["id"]][0]


# ---------------------------------------------------------------------------------------------
# (c) the batch job as a real spark-submit


def test_predict_job_spark_submit(trained, scoring_path, udf_rows, tmp_path):
    out = tmp_path / "preds"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1")
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[1]",
           "--conf", "spark.ui.enabled=false", "--conf", "spark.ui.showConsoleProgress=false",
           "--driver-memory", "1g",
           "jobs/predict.py", "--config", "conf/predict_digits.yaml",
           "--set", f"model_uri=models:/{NAME}@champion",
           "--set", f"tracking_uri={trained.tracking_uri}",
           "--set", f"source={scoring_path}", "--set", f"output={out}",
           "--set", "keep_cols=[id, label]", "--set", "batch_size=256"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote 1797 predictions of models:/{NAME}@champion to {out}" in proc.stdout
    table = pq.read_table(out)
    assert table.num_rows == 1797
    assert table.column_names == ["id", "label", "prediction", "probability"]
    got = table.to_pydict()
    for i, p, q in zip(got["id"], got["prediction"], got["probability"]):
        assert p == udf_rows[i][0]
        np.testing.assert_allclose(q, udf_rows[i][1], atol=PROB_ATOL)


def test_predict_config_is_strict(tmp_path):
    cfg = load_dataclass(PredictConfig, REPO / "conf" / "predict_digits.yaml",
                         ["output=x"])
    assert cfg.output == "x" and cfg.features_col == "features" and cfg.keep_cols == ("label",)
    with pytest.raises(ConfigError, match="unknown key outptu; valid keys are: model_uri, "):
        load_dataclass(PredictConfig, REPO / "conf" / "predict_digits.yaml", ["outptu=x"])
    with pytest.raises(ConfigError, match="exactly one of features_col .* or feature_cols"):
        load_dataclass(PredictConfig, REPO / "conf" / "predict_digits.yaml",
                       ["feature_cols=[a, b]"])
    with pytest.raises(ConfigError, match="mode: 'append' is not one of 'overwrite', 'error'"):
        load_dataclass(PredictConfig, REPO / "conf" / "predict_digits.yaml", ["mode=append"])


# ---------------------------------------------------------------------------------------------
# (d) bad input


@pytest.mark.parametrize("uri", ["models:/no_such_model/1", f"models:/{NAME}/7",
                                 f"models:/{NAME}@nope", "models:/m-0123456789abcdef",
                                 "runs:/0123456789abcdef0123456789abcdef/model"])
def test_unknown_model_uri_names_uri_and_store(trained, uri):
    with pytest.raises(ConfigError) as err:
        predict_udf(uri, tracking_uri=trained.tracking_uri)
    assert f"cannot load model {uri!r} from the MLflow tracking store {trained.tracking_uri}" \
        in str(err.value)


def test_missing_feature_column_lists_columns(trained, digits):
    with pytest.raises(DataError, match="feature column 'pixels' not found; columns are: "
                                        "features, label, id"):
        predict(digits, trained.model_uri, features_col="pixels",
                tracking_uri=trained.tracking_uri)


def test_wrong_number_of_numeric_columns_fails_on_the_driver(spark, trained):
    df = spark.createDataFrame([(1.0, 2.0, 3.0)], "a double, b double, c double")
    with pytest.raises(DataError, match="got 3 feature columns .* expects 64 features"):
        predict(df, trained.model_uri, feature_cols=["a", "b", "c"],
                tracking_uri=trained.tracking_uri)
    udf = predict_udf(trained.model_uri, tracking_uri=trained.tracking_uri)
    with pytest.raises(DataError, match="got 3 feature columns, but model .* expects 64"):
        udf("a", "b", "c")


def test_wrong_feature_type_fails_on_the_driver(spark, trained):
    df = spark.createDataFrame([("x",)], "features string")
    with pytest.raises(DataError, match="features_col 'features' has type string; expected an "
                                        "array of numbers"):
        predict(df, trained.model_uri, features_col="features", tracking_uri=trained.tracking_uri)


def test_wrong_array_width_fails_on_executors_with_widths(spark, trained):
    df = spark.createDataFrame([([0.5] * 10,)], "features array<float>")
    udf = predict_udf(trained.model_uri, tracking_uri=trained.tracking_uri)
    with pytest.raises(Exception, match="a feature array has 10 values, but .* expects 64"):
        df.select(udf("features")).collect()


def test_output_name_clash(spark, trained):
    df = spark.createDataFrame([([0.5] * 64, 1)], "features array<float>, prediction int")
    with pytest.raises(DataError, match="already has a column 'prediction'"):
        predict(df, trained.model_uri, features_col="features", tracking_uri=trained.tracking_uri)


# ---------------------------------------------------------------------------------------------
# regression, numeric columns and nulls


def test_regression_numeric_columns_and_nulls(spark, store, regression_uri):
    rows = [(0.5, -1.0, 2), (None, 1.0, 1), (1.5, 0.25, -3)]
    df = spark.createDataFrame(rows, "a double, b float, c int").withColumn(
        "id", F.monotonically_increasing_id())
    spec = resolve_model(regression_uri, tracking_uri=store)
    assert (spec.task, spec.in_features, spec.location) == ("regression", 3, regression_uri)
    got = predict(df, regression_uri, feature_cols=["a", "b", "c"], tracking_uri=store,
                  batch_size=1).orderBy("id").collect()
    assert set(got[0].asDict()) == {"a", "b", "c", "id", "prediction"}
    model = _torch_model(regression_uri, store)
    with torch.no_grad():
        want = model(torch.tensor([rows[0], rows[2]], dtype=torch.float32)).numpy()[:, 0]
    assert got[1]["prediction"] is None
    np.testing.assert_allclose([got[0]["prediction"], got[2]["prediction"]], want, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the Arrow conversion, without Spark


def test_feature_matrix_list_and_numeric_columns():
    arr = pa.array([[1, 2], None, [3, 4]], pa.list_(pa.float32()))
    x, mask = feature_matrix([arr], 2)
    np.testing.assert_array_equal(x, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(mask, [True, False, True])
    x, mask = feature_matrix([pa.array([1, None, 3, 4]), pa.array([0.5, 0.5, None, 1]),
                              pa.array([7, 8, 9, 10], pa.int8())], 3)
    np.testing.assert_array_equal(x, [[1, 0.5, 7], [4, 1, 10]])
    np.testing.assert_array_equal(mask, [True, False, False, True])
    x, mask = feature_matrix([pa.array([2, None], pa.int32())], 1)
    np.testing.assert_array_equal(x, [[2]])
    np.testing.assert_array_equal(mask, [True, False])
    x, mask = feature_matrix([arr.slice(2)], 2)
    assert x.dtype == np.float32 and x.flags.writeable and mask is None
    with pytest.raises(DataError, match="has 3 values, but 'm' expects 2"):
        feature_matrix([pa.array([[1, 2, 3]], pa.list_(pa.float64()))], 2, "'m'")
    with pytest.raises(DataError, match="null inside arrays"):
        feature_matrix([pa.array([[1, None]], pa.list_(pa.float64()))], 2)
    with pytest.raises(DataError, match="holds string; expected one array column or 2 numeric"):
        feature_matrix([pa.array(["a"]), pa.array([1])], 2)


def test_result_array_decodes_labels():
    spec = ModelSpec(uri="u", location="l", tracking_uri="t", in_features=2, num_outputs=3,
                     task="classification", classes=("cat", "dog", "eel"))
    y = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    out = result_array(spec, y, pa.array(["cat", "dog", "eel"]))
    assert out.field("prediction").to_pylist() == ["dog", "cat"]
    np.testing.assert_allclose(out.field("probability").to_pylist(), y)
    assert spec.return_type().simpleString() == \
        "struct<prediction:string,probability:array<float>>"
