"""``data.scale``: the scaling math against numpy, and on real local Spark with a real MLflow
store a job on features whose scales differ by 10^4: standardized, it reaches scikit-learn's
scaled logistic regression on the same split (within 2 points), the fitted scaling is stored with
the run, the ranks' rows are exactly the transform of the raw ones, and the logged model (pyfunc),
the UDF and the batch job give identical predictions on raw rows."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist import JobConfig, fit
from sparkml_dist.data.shard_store import FEATURES, LABEL, SPLIT
from sparkml_dist.inference import PredictConfig, predict_udf, run_prediction
from sparkml_dist.preprocessing import ARTIFACT, FeatureScaling

WIDTH = 6
SCALES = np.array([1e-2, 1e-1, 1.0, 10.0, 1e2, 1.0])  # largest / smallest = 10^4


def test_scaling_from_stats_matches_numpy():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, WIDTH)) * SCALES + 5 * SCALES).astype(np.float32)
    x[:, 5] = 3.0  # constant: scale 1, only shifted
    x64 = x.astype(np.float64)
    for kind in ("standard", "minmax"):
        s = FeatureScaling.from_stats(kind, x64.mean(0), x64.std(0), x64.min(0), x64.max(0), 200)
        out = s.apply(x)
        assert out.dtype == np.float32
        if kind == "standard":
            np.testing.assert_allclose(out[:, :5].mean(0), 0, atol=1e-5)
            np.testing.assert_allclose(out[:, :5].std(0), 1, rtol=1e-4)
        else:
            np.testing.assert_allclose(out[:, :5].min(0), 0, atol=1e-6)
            np.testing.assert_allclose(out[:, :5].max(0), 1, rtol=1e-5)
        assert np.all(out[:, 5] == 0) and s.scale[5] == 1.0
        assert FeatureScaling.from_json(s.to_json()) == s


def make_rows(n: int = 800, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes, separable up to noise by a linear rule on the standardized features."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, WIDTH))
    y = ((z @ np.array([1.5, -2.0, 1.0, 2.5, -1.0, 0.0]) + 0.3 * rng.normal(size=n)) > 0)
    x = (z * SCALES + 3 * SCALES).astype(np.float32)  # raw: very different scales and offsets
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def raw_df(spark):
    x, y = make_rows()
    rows = [tuple(float(v) for v in r) + (int(t),) for r, t in zip(x, y)]
    cols = [f"f{i}" for i in range(WIDTH)]
    return spark.createDataFrame(rows, cols + ["label"]), cols


def job(uri: str, cols: list[str]) -> JobConfig:
    return JobConfig().replace(**{
        "data.feature_cols": cols, "data.scale": "standard", "data.val_fraction": 0.25,
        "model.factory": "sparkml_dist.models:linear", "optimizer.name": "adam",
        "optimizer.lr": 0.05, "training.num_workers": 2, "training.batch_size": 32,
        "training.epochs": 15, "training.seed": 2, "tracking.tracking_uri": uri,
        "tracking.progress": False, "fault.max_restarts": 0})


def batch_job(spark, df, model_uri: str, tracking_uri: str, cols: list[str],
              tmp_path) -> tuple[pd.DataFrame, np.ndarray]:
    """The batch scoring job (``jobs/predict.py``'s ``run_prediction``) on ``df`` written as
    Parquet: the raw feature columns it read and its predictions, row for row."""
    src, out = str(tmp_path / "raw.parquet"), str(tmp_path / "scored")
    df.write.parquet(src)
    run_prediction(PredictConfig(model_uri=model_uri, tracking_uri=tracking_uri, source=src,
                                 feature_cols=tuple(cols), output=out, keep_cols=tuple(cols)),
                   spark)
    batch = spark.read.parquet(out).collect()
    raw = pd.DataFrame([[r[c] for c in cols] for r in batch], columns=cols)
    return raw, np.array([r["prediction"] for r in batch])


def test_standardized_job_matches_sklearn_and_every_scorer_agrees(spark, raw_df, tracking_uri,
                                                                  tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sparkml_dist.strategies import data_layout
    from sparkml_dist.spark.feature_scaling import fit_scaling, scale_prepared
    from sparkml_dist.spark.prepare import prepare

    df, cols = raw_df
    cfg = job(tracking_uri, cols)
    result = fit(df, cfg)

    # The same split the job used (numbering is a function of content and seed).
    prepared = prepare(spark, df, cfg.data, data_layout(cfg), cfg.training.seed)
    try:
        rows = prepared.frame.select(FEATURES, LABEL, SPLIT).collect()
        x = np.array([r[FEATURES] for r in rows], dtype=np.float32)
        y = np.array([r[LABEL] for r in rows])
        train = np.array([r[SPLIT] == 0 for r in rows])
        scaling = fit_scaling(prepared, "standard")
        scaled = scale_prepared(prepared, scaling).frame.select(FEATURES, SPLIT).collect()
    finally:
        prepared.release()
    # Spark's float32 transform is bitwise numpy's (and the logged model's torch) transform.
    assert np.array_equal(np.array([r[FEATURES] for r in scaled], dtype=np.float32),
                          scaling.apply(x))
    xt = x[train].astype(np.float64)
    np.testing.assert_allclose(scaling.shift, xt.mean(0), rtol=1e-5)  # training rows only
    np.testing.assert_allclose(1 / np.array(scaling.scale), xt.std(0), rtol=1e-4)

    ref = make_pipeline(StandardScaler(), LogisticRegression()).fit(x[train], y[train])
    ref_acc = ref.score(x[~train], y[~train])
    acc = result.metrics["val/accuracy"]
    assert acc >= ref_acc - 0.02, (acc, ref_acc)

    client = MlflowClient(tracking_uri)
    stored = FeatureScaling.from_json(
        open(client.download_artifacts(result.run_id, ARTIFACT, str(tmp_path))).read())
    assert stored == scaling and json.loads(stored.to_json())["kind"] == "standard"

    # Raw rows in: the logged model, the UDF and the batch job agree exactly.
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(result.model_uri)
    logits = np.asarray(model.predict(x))
    by_model = logits.argmax(1)
    assert (by_model[~train] == y[~train]).mean() == pytest.approx(acc, abs=1e-9)
    udf = predict_udf(result.model_uri, tracking_uri=tracking_uri)
    by_udf = np.array([r["p"]["prediction"] for r in
                       df.select(udf(*cols).alias("p")).collect()])
    x_src, by_batch = batch_job(spark, df, result.model_uri, tracking_uri, cols, tmp_path)
    x_src = x_src.to_numpy(np.float32)
    assert np.array_equal(by_batch, np.asarray(model.predict(x_src)).argmax(1))
    direct = np.array([[r[c] for c in cols] for r in df.collect()], dtype=np.float32)
    assert np.array_equal(by_udf, np.asarray(model.predict(direct)).argmax(1))


def test_fill_from_stats_and_apply_match_numpy():
    from sparkml_dist.preprocessing import MissingFill

    x = np.array([[1.0, np.nan, 4.0], [3.0, 2.0, np.nan], [np.nan, 6.0, np.nan]], np.float32)
    x64 = x.astype(np.float64)
    mean, median = np.nanmean(x64, 0), np.nanmedian(x64, 0)
    for kind, want in (("mean", mean), ("median", median), ("zero", np.zeros(3))):
        fill = MissingFill.from_stats(kind, mean, median, np.isnan(x).sum(0), 3)
        out = fill.apply(x)
        assert out.dtype == np.float32 and not np.isnan(out).any()
        assert np.array_equal(out[~np.isnan(x)], x[~np.isnan(x)])  # present values untouched
        np.testing.assert_allclose(fill.values, want, rtol=1e-6)
        assert fill.missing == (1, 1, 2) and MissingFill.from_json(fill.to_json()) == fill
    # A feature with no value at all is filled with 0.
    empty = MissingFill.from_stats("mean", np.array([np.nan]), np.array([np.nan]), [3], 3)
    assert empty.values == (0.0,)


MISSING_SHARE = 0.15


def fill_and_scale(prepared):
    """The mean fill, then the standard scaling, fitted and applied as a job does: (fill,
    scaling, the feature rows the ranks get)."""
    from sparkml_dist.spark.feature_scaling import fill_prepared, fit_fill, fit_scaling, \
        scale_prepared

    fill = fit_fill(prepared, "mean")
    filled = fill_prepared(prepared, fill)
    scaling = fit_scaling(filled, "standard")
    rows = scale_prepared(filled, scaling).frame.select(FEATURES).collect()
    return fill, scaling, np.array([r[FEATURES] for r in rows], dtype=np.float32)


def test_filled_and_standardized_job_every_scorer_agrees_on_rows_with_nulls(
        spark, tracking_uri, tmp_path):
    """``data.on_invalid=fill`` with ``data.scale=standard`` on raw rows where 15% of the values
    are null: the fill is the training split's mean, the ranks train on exactly
    ``scale(fill(raw))``, and the logged model (pyfunc), the UDF and the batch job score the raw
    rows with their nulls identically (no null results)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sparkml_dist.preprocessing import FILL_ARTIFACT, MissingFill
    from sparkml_dist.spark.prepare import prepare
    from sparkml_dist.strategies import data_layout

    x, y = make_rows(seed=1)
    rng = np.random.default_rng(5)
    holes = rng.random(x.shape) < MISSING_SHARE
    holes[:, 5] = False
    cols = [f"f{i}" for i in range(WIDTH)]
    rows = [tuple(None if h else float(v) for v, h in zip(r, hr)) + (int(t),)
            for r, hr, t in zip(x, holes, y)]
    rows.append((1.0,) * WIDTH + (None,))  # a missing label: dropped, not filled
    df = spark.createDataFrame(rows, ", ".join(f"{c} double" for c in cols) + ", label long")
    cfg = job(tracking_uri, cols).replace(**{"data.on_invalid": "fill", "data.fill": "mean"})
    result = fit(df, cfg)

    prepared = prepare(spark, df, cfg.data, data_layout(cfg), cfg.training.seed)
    try:
        got = prepared.frame.select(FEATURES, LABEL, SPLIT).collect()
        raw = np.array([[np.nan if v is None else v for v in r[FEATURES]] for r in got],
                       dtype=np.float32)
        labels = np.array([r[LABEL] for r in got])
        train = np.array([r[SPLIT] == 0 for r in got])
        fill, scaling, ranks_rows = fill_and_scale(prepared)
    finally:
        prepared.release()
    assert len(raw) == len(x) and np.isnan(raw).any()  # the label-less row is dropped
    np.testing.assert_allclose(fill.values, np.nanmean(raw[train].astype(np.float64), 0),
                               rtol=1e-5)  # the training split only
    assert fill.missing == tuple(int(m) for m in np.isnan(raw[train]).sum(0))
    assert np.array_equal(ranks_rows, scaling.apply(fill.apply(raw)))

    client = MlflowClient(tracking_uri)
    stored = MissingFill.from_json(
        open(client.download_artifacts(result.run_id, FILL_ARTIFACT, str(tmp_path))).read())
    assert stored == fill
    assert FeatureScaling.from_json(open(client.download_artifacts(
        result.run_id, ARTIFACT, str(tmp_path))).read()) == scaling

    ref = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression())
    ref_acc = ref.fit(raw[train], labels[train]).score(raw[~train], labels[~train])
    acc = result.metrics["val/accuracy"]
    assert acc >= ref_acc - 0.03, (acc, ref_acc)

    # Raw rows with nulls in: the logged model, the UDF and the batch job agree exactly.
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(result.model_uri)
    src = df.where("label IS NOT NULL")
    direct = np.array([[np.nan if r[c] is None else r[c] for c in cols] for r in src.collect()],
                      dtype=np.float32)
    want = np.asarray(model.predict(direct)).argmax(1)
    assert (np.asarray(model.predict(raw[~train])).argmax(1) == labels[~train]).mean() \
        == pytest.approx(acc, abs=1e-9)
    udf = predict_udf(result.model_uri, tracking_uri=tracking_uri)
    assert udf.spec.fills_missing
    by_udf = [r["p"]["prediction"] for r in src.select(udf(*cols).alias("p")).collect()]
    assert None not in by_udf and np.array_equal(np.array(by_udf), want)
    x_src, by_batch = batch_job(spark, src, result.model_uri, tracking_uri, cols, tmp_path)
    x_src = x_src.to_numpy(np.float32)
    assert np.isnan(x_src).any()
    assert np.array_equal(by_batch, np.asarray(model.predict(x_src)).argmax(1))


COLORS = ("blue", "green", "red", "teal")


def test_one_hot_encoding_matches_numpy_and_the_torch_module():
    import torch

    from sparkml_dist.preprocessing import OneHotEncoding, OneHotModel

    enc = OneHotEncoding(numeric_cols=("a",), categorical=(("c", ("x", "y", "z")),
                                                           ("d", ("p",))))
    coded = enc.encode([np.array([1.5, np.nan, 3.0], np.float32),
                        np.array(["y", None, "unseen"], object),
                        np.array(["p", float("nan"), "p"], object)])
    assert np.array_equal(coded, np.array([[1.5, 1, 0], [np.nan, -1, -1], [3.0, -1, 0]],
                                          np.float32), equal_nan=True)
    want = np.array([[1.5, 0, 1, 0, 1], [np.nan, 0, 0, 0, 0], [3.0, 0, 0, 0, 1]], np.float32)
    assert np.array_equal(enc.expand(coded), want, equal_nan=True) and enc.width == 5
    model = OneHotModel(torch.nn.Identity(), enc)
    assert np.array_equal(model(torch.from_numpy(coded)).numpy(), want, equal_nan=True)
    assert OneHotEncoding.from_json(enc.to_json()) == enc


def make_mixed_rows(n: int = 900, seed: int = 3) -> tuple[list[tuple], list[str]]:
    """Two numeric columns (15% null) and a string column (null 5%); the class depends on both."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    color = rng.integers(0, len(COLORS), size=n)
    effect = np.array([2.0, -2.0, 0.5, -0.5])[color]
    y = (z @ np.array([1.5, -1.0]) + effect + 0.3 * rng.normal(size=n)) > 0
    x = z * np.array([100.0, 0.01]) + np.array([500.0, 0.0])
    rows = []
    for r, c, t in zip(x, color, y):
        vals = [None if rng.random() < MISSING_SHARE else float(v) for v in r]
        rows.append((*vals, None if rng.random() < 0.05 else COLORS[c], int(t)))
    return rows, ["a", "b", "color"]


def test_one_hot_job_every_scorer_agrees_on_raw_rows_with_strings_and_nulls(
        spark, tracking_uri, tmp_path):
    """``data.categorical_cols`` with ``on_invalid=fill`` and ``scale=standard``: the
    vocabulary is the training split's, the ranks train on exactly
    ``scale(fill(one_hot(raw)))``, and the logged pyfunc model (a pandas DataFrame of raw
    columns with strings and nulls), the UDF and the batch job give identical predictions."""
    from sklearn.compose import make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from sparkml_dist.preprocessing import ONE_HOT_ARTIFACT, OneHotEncoding
    from sparkml_dist.spark.feature_scaling import fit_one_hot, one_hot_prepared
    from sparkml_dist.spark.prepare import prepare
    from sparkml_dist.strategies import data_layout

    rows, cols = make_mixed_rows()
    df = spark.createDataFrame(rows, "a double, b double, color string, label long")
    cfg = job(tracking_uri, ["a", "b"]).replace(**{
        "data.categorical_cols": ["color"], "data.on_invalid": "fill"})
    result = fit(df, cfg)

    prepared = prepare(spark, df, cfg.data, data_layout(cfg), cfg.training.seed)
    try:
        assert prepared.categories == (("color", COLORS),)  # every value, for the coding
        got = prepared.frame.select(FEATURES, LABEL, SPLIT).collect()
        coded = np.array([[np.nan if v is None else v for v in r[FEATURES]] for r in got],
                         dtype=np.float32)
        labels = np.array([r[LABEL] for r in got])
        train = np.array([r[SPLIT] == 0 for r in got])
        enc = fit_one_hot(prepared, ("a", "b"))
        fill, scaling, ranks_rows = fill_and_scale(one_hot_prepared(prepared, enc))
    finally:
        prepared.release()
    seen = sorted({COLORS[int(g)] for g in coded[train, 2] if g >= 0})
    assert enc.categorical == (("color", tuple(seen)),)  # from the training split
    # Training codes index all values; the model's index its vocabulary: the same here.
    assert np.array_equal(ranks_rows, scaling.apply(fill.apply(enc.expand(coded))))
    stored = OneHotEncoding.from_json(open(MlflowClient(tracking_uri).download_artifacts(
        result.run_id, ONE_HOT_ARTIFACT, str(tmp_path))).read())
    assert stored == enc

    frame = pd.DataFrame([r[:3] for r in rows], columns=cols)
    truth = np.array([r[3] for r in rows])
    ref = make_pipeline(
        make_column_transformer((make_pipeline(SimpleImputer(), StandardScaler()), ["a", "b"]),
                                (OneHotEncoder(handle_unknown="ignore"), ["color"])),
        LogisticRegression())
    # scikit-learn's imputer + scaler + one-hot + logistic regression on a 75/25 cut of the
    # rows (not the job's split): a yardstick for the accuracy, with a looser tolerance.
    cut = int(0.75 * len(rows))
    ref_acc = ref.fit(frame.fillna({"color": "none"})[:cut], truth[:cut]).score(
        frame.fillna({"color": "none"})[cut:], truth[cut:])
    assert result.metrics["val/accuracy"] >= ref_acc - 0.05, (result.metrics, ref_acc)

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(result.model_uri)
    by_model = np.asarray(model.predict(frame)).argmax(1)
    assert (by_model == truth).mean() > 0.8
    udf = predict_udf(result.model_uri, tracking_uri=tracking_uri)
    ordered = df.orderBy("a", "b", "color").collect()
    by_udf = [r["p"]["prediction"] for r in
              df.orderBy("a", "b", "color").select(udf(*cols).alias("p")).collect()]
    want = np.asarray(model.predict(pd.DataFrame([r[:3] for r in ordered], columns=cols)))
    assert None not in by_udf and np.array_equal(np.array(by_udf), want.argmax(1))
    raw, by_batch = batch_job(spark, df, result.model_uri, tracking_uri, cols, tmp_path)
    assert raw["color"].isna().any() and raw["a"].isna().any()
    assert np.array_equal(by_batch, np.asarray(model.predict(raw)).argmax(1))


def test_a_string_column_with_too_many_values_fails_before_launch(spark, tracking_uri):
    from sparkml_dist.errors import DataError

    rows = [(float(i), f"id-{i % 30}", i % 2) for i in range(120)]
    df = spark.createDataFrame(rows, "a double, user string, label long")
    cfg = job(tracking_uri, ["a"]).replace(**{"data.categorical_cols": ["user"],
                                              "data.max_categories": 25, "data.scale": "none"})
    with pytest.raises(DataError, match=r"'user' has more than 25 distinct values "
                                        r"\(data.max_categories\)"):
        fit(df, cfg)
    assert not MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()])
