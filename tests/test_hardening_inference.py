"""Pickle-free scoring: ``allow_pickle=False`` refuses a model saved with pickle on the driver and
on the executor, and scores a ``torch.export`` model (what ``fit`` logs) through Spark."""

import os

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from sparkml_dist.errors import ConfigError
from sparkml_dist.inference import load_torch_model, predict_udf, resolve_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same small classifier logged twice: as a pickle and as a torch.export archive."""
    store = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    sig = infer_signature(x, net(torch.as_tensor(x)).detach().numpy())
    uris = {}
    with mlflow.start_run():
        for fmt in ("pickle", "pt2"):
            info = mlflow.pytorch.log_model(net, name=f"model_{fmt}", signature=sig,
                                            input_example=x, serialization_format=fmt,
                                            pip_requirements=["torch"])
            uris[fmt] = info.model_uri
    return store, uris, net, x


def test_pickle_model_is_refused_on_the_driver(models):
    store, uris, _, _ = models
    with pytest.raises(ConfigError, match=r"is saved with pickle .*allow_pickle=False refuses"):
        resolve_model(uris["pickle"], tracking_uri=store, task="classification",
                      allow_pickle=False)
    assert resolve_model(uris["pickle"], tracking_uri=store, task="classification").allow_pickle


def test_pickle_model_is_refused_where_it_loads(models):
    store, uris, _, _ = models
    spec = resolve_model(uris["pickle"], tracking_uri=store, task="classification")
    before = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    with pytest.raises(MlflowException, match="Deserializing model using pickle is disallowed"):
        load_torch_model(spec.location, store, allow_pickle=False)
    assert os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION") == before  # restored


def test_pickle_free_model_scores_through_spark(spark, models):
    store, uris, net, x = models
    udf = predict_udf(uris["pt2"], tracking_uri=store, task="classification", allow_pickle=False)
    assert udf.spec.allow_pickle is False
    df = spark.createDataFrame([(i, [float(v) for v in row]) for i, row in enumerate(x)],
                               "id int, features array<float>")
    rows = sorted(df.select("id", udf("features").alias("p")).collect())
    with torch.no_grad():
        want = torch.softmax(net(torch.as_tensor(x)), dim=1).numpy()
    got = np.array([r.p.probability for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
