"""The pyspark.ml Pipeline (``VectorAssembler`` + :class:`SparkMLDistEstimator`) through Spark
Connect: it fits, transforms, saves and loads there. A module of its own: a Connect client
cannot start while the classic session of another module's fixture runs."""

from __future__ import annotations

import numpy as np

from tests.conftest import sqlite_store
from tests.test_connect import connect_server, remote  # noqa: F401 - the Connect fixtures
from tests.test_estimator import COLS, CLASSES, _scores, estimator, make_rows


def test_pipeline_through_spark_connect(remote, tmp_path):  # noqa: F811
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql.utils import is_remote

    assert is_remote()
    tracking_uri = sqlite_store(tmp_path / "mlflow.db")
    df = remote.createDataFrame([(i, *r) for i, r in enumerate(make_rows(160, seed=3))],
                                ["id", *COLS, "kind"])
    fitted = Pipeline(stages=[VectorAssembler(inputCols=COLS, outputCol="features"),
                              estimator(tracking_uri).setParams(epochs=2)]).fit(df)
    preds, probs = _scores(fitted.transform(df))
    assert set(preds) <= set(CLASSES) and probs.shape == (160, 3)
    path = str(tmp_path / "pipeline_model")
    fitted.save(path)
    preds2, probs2 = _scores(PipelineModel.load(path).transform(df))
    assert preds2 == preds and np.array_equal(probs2, probs)
