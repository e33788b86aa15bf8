"""Federated rounds on real local Spark with a real MLflow store, against single-process torch
references: the FedAvg/FedSGD reduction, accuracy on digits (IID and Dirichlet non-IID), secure
aggregation with drop-outs, DP accounting and budget stop, a killed client task, and resume."""

from __future__ import annotations

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from sparkml_dist.config import (
    CheckpointConfig, DataConfig, JobConfig, ModelConfig, OptimizerConfig, TrackingConfig,
    TrainingConfig)
from sparkml_dist.errors import DataError
from sparkml_dist.strategies.federated import weights
from sparkml_dist.strategies.federated.config import (
    ClientCrash, FederatedConfig, PrivacyConfig, SecureAggregationConfig)
from sparkml_dist.strategies.federated.driver import fit_federated
from sparkml_dist.strategies.federated.partitioner import dirichlet_clients, iid_clients
from sparkml_dist.tracking.run import JobRun

# Up to 4 attempts per task: a killed client task is retried by Spark (local mode's default is 1).
SPARK_MASTER = "local[2,4]"
SEED = 3


def _cfg(tracking_uri: str, *, val_fraction: float = 0.2, lr: float = 0.2, momentum: float = 0.5,
         hidden=(64,), checkpoint: bool = True) -> JobConfig:
    return JobConfig(
        data=DataConfig(features_col="features", val_fraction=val_fraction),
        model=ModelConfig(kwargs={"hidden": list(hidden)}),
        optimizer=OptimizerConfig(name="sgd", lr=lr, momentum=momentum),
        training=TrainingConfig(seed=SEED),
        checkpoint=CheckpointConfig(enabled=checkpoint),
        tracking=TrackingConfig(tracking_uri=tracking_uri, log_model=False, progress=False))


def _fit(spark, df, cfg, fed, resume_run_id=None, finish=True):
    """``finish=False`` leaves the run RUNNING, as a driver that died would."""
    run = JobRun(cfg, resume_run_id)
    try:
        out = fit_federated(spark, df, cfg, run, fed)
    except BaseException:
        run.finish("FAILED")
        raise
    if finish:
        run.finish()
    return out, run


def _history(run, key):
    return [m.value for m in sorted(run.client.get_metric_history(run.run_id, key),
                                    key=lambda m: m.step)]


@pytest.fixture(scope="module")
def digits(spark, digits_path):
    return spark.read.parquet(str(digits_path))


@pytest.fixture(scope="module")
def iid20(digits):
    return iid_clients(digits, 20, seed=1)


def test_fedavg_with_one_full_batch_step_per_partition_is_synchronous_sgd(spark, digits,
                                                                           tracking_uri):
    """The textbook reduction (FedSGD): one full-batch local step per client, sample-weighted
    averaging, equals full-batch gradient descent on the union of the clients' rows."""
    from sparkml_dist.datasets import digits_table
    from sparkml_dist.models import build_model

    cfg = _cfg(tracking_uri, val_fraction=0.0, lr=0.5, momentum=0.0, hidden=(16,),
               checkpoint=False)
    fed = FederatedConfig(rounds=3, local_steps=1, local_batch_size=100_000)
    # 4 IID partitions of unequal sizes (about 10/20/30/40%), so a wrong weighting shows.
    from pyspark.sql import functions as F

    # Keys k_0..k_3 that Spark's hash partitioning sends to partitions 0..3.
    keys = {int(r[0]): int(r[1]) for r in spark.range(64).groupBy(
        F.expr("pmod(hash(id), 4)")).agg(F.min("id")).collect()}
    bucket = F.pmod(F.xxhash64("features", "label"), F.lit(10))
    part = (F.when(bucket < 1, keys[0]).when(bucket < 3, keys[1]).when(bucket < 6, keys[2])
            .otherwise(keys[3]))
    df = digits.withColumn("p", part.cast("long")).repartition(4, "p").drop("p")
    sizes = sorted(r[1] for r in df.groupBy(F.spark_partition_id()).count().collect())
    assert len(sizes) == 4 and sizes[-1] > 3 * sizes[0]
    out, run = _fit(spark, df, cfg, fed)
    assert _history(run, "fed/clients_answered") == [4.0, 4.0, 4.0]

    table = digits_table()
    x = torch.tensor(np.stack(table.column("features").to_pylist()), dtype=torch.float32)
    y = torch.tensor(table.column("label").to_numpy())
    torch.manual_seed(SEED)
    ref = build_model(cfg.model.factory, 64, 10, cfg.model.kwargs)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    np.testing.assert_allclose(out["weights"].numpy(), weights.flatten(ref).numpy(),
                               rtol=0, atol=1e-5)


def test_fedavg_reaches_95_percent_on_digits_with_20_clients(spark, iid20, tracking_uri):
    fed = FederatedConfig(client_col="client", rounds=10, local_epochs=5, local_batch_size=16)
    out, run = _fit(spark, iid20, _cfg(tracking_uri, checkpoint=False), fed)
    assert out["clients"] == 20
    assert max(_history(run, "val/accuracy")) >= 0.95
    assert out["metrics"]["val/accuracy"] >= 0.95


def test_fedprox_matches_or_beats_fedavg_on_dirichlet_non_iid(spark, digits, tracking_uri):
    skewed = dirichlet_clients(digits, "label", 20, 0.3, seed=1)
    accs = {}
    for mu in (0.0, 0.01):
        fed = FederatedConfig(client_col="client", rounds=20, local_epochs=5,
                              local_batch_size=16, proximal_mu=mu)
        out, _ = _fit(spark, skewed, _cfg(tracking_uri, checkpoint=False), fed)
        accs[mu] = out["metrics"]["val/accuracy"]
    assert accs[0.01] >= accs[0.0] - 0.01, accs


def test_secure_aggregation_with_drop_outs_equals_the_plain_average(spark, iid20, tracking_uri):
    base = dict(client_col="client", rounds=2, local_epochs=1, local_batch_size=32,
                simulate_dropout=0.2)
    plain, _ = _fit(spark, iid20, _cfg(tracking_uri, checkpoint=False),
                    FederatedConfig(**base))
    secure, run = _fit(spark, iid20, _cfg(tracking_uri, checkpoint=False), FederatedConfig(
        **base, secure_aggregation=SecureAggregationConfig(threshold=0.5, quant_bits=20)))
    assert _history(run, "fed/clients_answered") == [16.0, 16.0]  # 20% dropped after masking
    assert _history(run, "secagg/threshold") == [10.0, 10.0]
    # Sums of 16 quantized updates (2**-21 each, weights up to ~90 rows) then two server steps.
    np.testing.assert_allclose(secure["weights"].numpy(), plain["weights"].numpy(), atol=1e-4)
    missing = run.client.list_artifacts(run.run_id, "clients")
    assert [f.path for f in missing] == ["clients/missing-round-000000.json",
                                        "clients/missing-round-000001.json"]


def _central_eps(z, q, rounds, delta):
    acc = rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)),
                                        rounds))
    return acc.get_epsilon(delta)


def test_dp_epsilon_is_the_accountants_and_the_budget_stops_at_the_right_round(
        spark, iid20, tracking_uri):
    z, q, delta = 0.8, 5 / 20, 1e-5
    expected = [_central_eps(z, q, k, delta) for k in range(1, 8)]
    budget = (expected[2] + expected[3]) / 2  # round 4 would exceed it
    fed = FederatedConfig(client_col="client", rounds=7, clients_per_round=5, sampling="poisson",
                          local_epochs=1, eval_every_rounds=10, privacy=PrivacyConfig(
                              clip_norm=0.5, noise_multiplier=z, delta=delta,
                              epsilon_budget=budget))
    out, run = _fit(spark, iid20, _cfg(tracking_uri, checkpoint=False), fed)
    assert out["rounds"] == 3 and out["stopped_by_budget"]
    np.testing.assert_allclose(_history(run, "privacy/epsilon"), expected[:3], rtol=1e-12)
    assert out["epsilon"] == pytest.approx(expected[2], rel=1e-12)
    assert "round 4" in run.client.get_run(run.run_id).data.tags["sparkml_dist.federated.stopped"]


def test_clipping_bounds_each_clients_contribution(spark, iid20, tracking_uri):
    clip = 0.05
    fed = FederatedConfig(client_col="client", rounds=2, local_epochs=2, eval_every_rounds=10,
                          privacy=PrivacyConfig(clip_norm=clip, noise_multiplier=0.0))
    out, run = _fit(spark, iid20, _cfg(tracking_uri, lr=0.5, checkpoint=False), fed)
    norms = _history(run, "fed/update_norm")
    # Every client's update was longer than the clip (lr 0.5, 2 epochs), so the average of 20
    # clipped updates moves the model by at most the clip norm and, updates being alike, nearly
    # by it.
    assert all(0.5 * clip < n <= clip * (1 + 1e-6) for n in norms), norms


def test_sample_level_dp_sgd_reports_the_worst_clients_epsilon(spark, iid20, tracking_uri):
    z, batch, steps, delta = 1.2, 16, 3, 1e-5
    cfg = _cfg(tracking_uri, val_fraction=0.0, lr=0.1, momentum=0.0, checkpoint=False)
    fed = FederatedConfig(client_col="client", rounds=1, local_steps=steps, local_batch_size=batch,
                          privacy=PrivacyConfig(level="sample", clip_norm=1.0,
                                                noise_multiplier=z, delta=delta))
    out, _ = _fit(spark, iid20, cfg, fed)
    rows = [r[1] for r in iid20.groupBy("client").count().collect()]
    expected = max(_central_eps(z, min(1.0, batch / n), steps, delta) for n in rows)
    assert out["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert np.isfinite(out["weights"].numpy()).all()


def test_a_killed_client_task_is_retried_and_counted_once_and_resume_is_bitwise(
        spark, iid20, tracking_uri):
    # FedAdam: the server's moments must come back from the checkpoint for resume to be bitwise.
    base = dict(client_col="client", rounds=3, local_epochs=1, clients_per_round=8,
                eval_every_rounds=10, server_optimizer="fedadam", server_lr=0.01)
    cfg = _cfg(tracking_uri)
    clean, _ = _fit(spark, iid20, cfg, FederatedConfig(**base))
    crashed, run = _fit(spark, iid20, cfg, FederatedConfig(
        **base, inject_crash=ClientCrash(round=1, client=_second_round_client(spark, iid20))))
    assert _history(run, "fed/clients_answered") == [8.0, 8.0, 8.0]
    assert _history(run, "fed/retried_tasks")[1] >= 1  # round 2 came from a retried task
    assert torch.equal(crashed["weights"], clean["weights"])

    # A driver that dies after round 1 (its run left RUNNING), then the job resumed in that run.
    _, run1 = _fit(spark, iid20, cfg, FederatedConfig(**{**base, "rounds": 1}), finish=False)
    resumed, run2 = _fit(spark, iid20, cfg, FederatedConfig(**base), resume_run_id=run1.run_id)
    assert run2.run_id == run1.run_id and resumed["rounds"] == 3
    assert torch.equal(resumed["weights"], clean["weights"])
    assert _history(run2, "fed/clients_sampled") == [8.0, 8.0, 8.0]


def _second_round_client(spark, df) -> str:
    from sparkml_dist.strategies.federated.sampling import sample_clients

    clients = sorted(r[0] for r in df.select("client").distinct().collect())
    return str(clients[int(sample_clients(len(clients), 8, "fixed", SEED, 1)[0])])


def test_a_missing_client_column_names_the_columns(spark, digits, tracking_uri):
    with pytest.raises(DataError, match="client column 'user'.*features, label"):
        _fit(spark, digits, _cfg(tracking_uri), FederatedConfig(client_col="user"))
