"""Early stopping on a validation metric: the rule against a hand-written reference, then real
gloo ranks (tests/ranks.py) on a run built to overfit, which must stop at the epoch the rule gives
for its own logged validation history, every rank together, with a final checkpoint, the best
epoch's model kept, and a resume after the stop that trains nothing more."""

import math

import pytest
import torch

from sparkml_dist.config import JobConfig
from sparkml_dist.errors import ConfigError
from sparkml_dist.training.checkpoint import BEST_NAME, SHARED_PART, load_part
from sparkml_dist.training.early_stopping import EarlyStopping
from sparkml_dist.training.local_store import DirectoryCheckpointStore
from tests.ranks import digits, final_model, run_ranks


def reference_stop(values, mode, patience, min_delta):
    """(stop epoch or None, best epoch), 1-based, written out longhand."""
    sign = 1.0 if mode == "min" else -1.0
    best, best_epoch, bad = math.inf, 0, 0
    for epoch, v in enumerate(values, start=1):
        if sign * v < best - min_delta:
            best, best_epoch, bad = sign * v, epoch, 0
        else:
            bad += 1
        if bad >= patience:
            return epoch, best_epoch
    return None, best_epoch


@pytest.mark.parametrize("mode", ["min", "max"])
def test_rule_matches_the_reference_on_noisy_histories(mode):
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        values = torch.randn(30, generator=gen).cumsum(0).tolist()
        patience, delta = 1 + trial % 4, [0.0, 0.1, 0.5][trial % 3]
        rule = EarlyStopping(mode, patience, delta)
        stopped = None
        for epoch, v in enumerate(values, start=1):
            rule.update(v, epoch)
            if rule.state.stopped:
                stopped = epoch
                break
        expected, best_epoch = reference_stop(values, mode, patience, delta)
        assert stopped == expected, (values, patience, delta)
        assert rule.state.best_epoch == best_epoch


def test_min_delta_counts_a_small_gain_as_no_improvement():
    rule = EarlyStopping("min", 2, 0.1)
    assert rule.update(1.0, 1) and not rule.update(0.95, 2)  # 0.05 better: not enough
    assert not rule.state.stopped and not rule.update(0.92, 3) and rule.state.stopped
    assert rule.state.best == 1.0 and rule.state.best_epoch == 1


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="data.val_fraction"):
        JobConfig().replace(**{"training.early_stopping": {}, "data.val_fraction": 0.0})
    with pytest.raises(ConfigError, match="val/rmse"):
        JobConfig().replace(**{"training.early_stopping.metric": "val/accuracy",
                               "data.task": "regression", "data.split": "random",
                               "data.sharding": "random"})
    with pytest.raises(ConfigError, match="patience"):
        JobConfig().replace(**{"training.early_stopping.patience": 0})
    with pytest.raises(ConfigError, match="valid keys"):
        JobConfig().replace(**{"training.early_stopping.wait": 2})
    es = JobConfig().replace(**{"training.early_stopping.metric": "val/accuracy"})
    assert es.training.early_stopping.resolved_mode() == "max"


# -- real ranks -----------------------------------------------------------------------------

EPOCHS, PATIENCE = 60, 3


def overfit_job(**extra) -> JobConfig:
    """Few rows, a wide MLP and a high learning rate: validation loss turns up within a few
    epochs and keeps rising."""
    return JobConfig().replace(**{
        "model.kwargs": {"hidden": [256, 256]}, "optimizer.name": "adam", "optimizer.lr": 0.01,
        "training.num_workers": 2, "training.batch_size": 16, "training.epochs": EPOCHS,
        "training.seed": 5, "training.log_every_steps": 5, "backend.timeout_s": 60.0,
        "checkpoint.keep_last": 1,
        "training.early_stopping": {"metric": "val/loss", "patience": PATIENCE,
                                    "min_delta": 0.0, "keep_best": True}, **extra})


def _ok(results):
    bad = {r: v for r, v in results.items() if v[0] != "ok"}
    assert not bad, bad
    return results


def test_overfitting_run_stops_at_the_rules_epoch_on_every_rank(tmp_path):
    cfg, data = overfit_job(), digits(200)
    steps = 5  # 160 training rows, 80 per rank, batch 16
    res = _ok(run_ranks(cfg, data, str(tmp_path), timeout_s=240))
    rows = res[0][1]["sink"]
    history = [(step, m["val/loss"]) for step, m in rows if "val/loss" in m]
    values = [v for _, v in history]
    expected, best_epoch = reference_stop(values, "min", PATIENCE, 0.0)
    assert expected is not None and expected < EPOCHS, values  # the run did overfit
    assert len(values) == expected  # not one epoch validated past the stop
    assert [s for s, _ in history] == [steps * e for e in range(1, expected + 1)]
    stopped = [m for _, m in rows if "early_stopping/stopped_epoch" in m]
    assert [m["early_stopping/stopped_epoch"] for m in stopped] == [float(expected)]
    for rank in (0, 1):  # every rank ended after the same epoch
        assert res[rank][1]["metrics"]["epoch"] == float(expected)

    store = DirectoryCheckpointStore(tmp_path)
    last = store.read_meta(store.complete_names()[0])
    assert last.final and last.steps_done == steps * expected
    assert last.early_stopping["best_epoch"] == best_epoch
    best_meta = store.read_meta(BEST_NAME)
    assert best_meta.steps_done == steps * best_epoch
    assert best_meta.early_stopping["best"] == pytest.approx(min(values), rel=1e-12)
    best = load_part(store, BEST_NAME, best_meta, SHARED_PART)["model"]
    last_model = final_model(str(tmp_path))
    assert best.keys() == last_model.keys()
    assert any(not torch.equal(best[k], last_model[k]) for k in best)  # a different epoch

    # Relaunched after the stop: the final checkpoint ends the job, nothing more is trained.
    again = _ok(run_ranks(cfg, data, str(tmp_path), attempt=1, timeout_s=240))
    assert again[0][1]["resumed_from"] == steps * expected
    assert not [m for _, m in again[0][1]["sink"] if "train/loss" in m]
    assert again[0][1]["metrics"]["val/loss"] == pytest.approx(values[-1], rel=1e-6)


# -- through fit on local Spark, tracked in MLflow ----------------------------------------------

def test_fit_stops_by_the_logged_history_and_logs_the_best_epochs_model(spark, digits_path,
                                                                        tracking_uri):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from sparkml_dist import fit
    from sparkml_dist.api import best_state, final_state
    from sparkml_dist.models import mlp

    df = spark.read.parquet(str(digits_path)).limit(250)
    cfg = overfit_job(**{"data.features_col": "features", "tracking.tracking_uri": tracking_uri,
                         "tracking.progress": False, "fault.max_restarts": 0})
    result = fit(df, cfg)
    client = MlflowClient(tracking_uri)
    history = sorted(client.get_metric_history(result.run_id, "val/loss"), key=lambda m: m.step)
    values = [m.value for m in history]
    expected, best_epoch = reference_stop(values, "min", PATIENCE, 0.0)
    assert expected is not None and expected < EPOCHS, values
    assert len(values) == expected
    (stopped,) = client.get_metric_history(result.run_id, "early_stopping/stopped_epoch")
    assert stopped.value == expected and result.metrics["epoch"] == expected

    best, last = best_state(result.run_id, tracking_uri), final_state(result.run_id, tracking_uri)
    assert any(not torch.equal(best[k], last[k]) for k in best)
    net = mlp(64, 10, hidden=[256, 256])
    net.load_state_dict(best)
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(x)).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    got = np.asarray(mlflow.pyfunc.load_model(result.model_uri).predict(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # the best epoch's model
    # ... and the logged model carries that epoch's validation, not the last one's
    best_step = history[values.index(min(values))].step
    model_id = result.model_uri.removeprefix("models:/").split("/")[0]
    linked = {m.key: m for m in client.get_logged_model(model_id).metrics or []}
    assert linked["val/loss"].step == best_step and linked["val/loss"].value == min(values)
