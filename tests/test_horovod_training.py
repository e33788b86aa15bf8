"""``backend.name: horovod`` runs the same jobs as the torch backend, through Horovod over Gloo.

Real local Spark, a real MLflow store and a real Horovod build. Without Horovod these tests fail
(never skip): build it with scripts/build_horovod.sh.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sparkml_dist import FitResult, JobConfig, final_state, fit, load_config
from sparkml_dist.comm.horovod import import_horovod
from sparkml_dist.strategies.data_parallel.horovod_engine import HorovodOptimizer
from sparkml_dist.errors import UserCodeError
from tests.conftest import sqlite_store
from tests.test_equivalence import job_config, reference_weights
from tests.test_fault_tolerance import K as FT_EVERY_STEPS
from tests.test_fault_tolerance import assert_bitwise_equal, ft_config
from tests.test_horovod_gloo import require_horovod

pytestmark = pytest.mark.horovod

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


@dataclass(frozen=True)
class Job:
    result: FitResult
    cfg: JobConfig
    uri: str


@pytest.fixture(scope="module")
def small_df(spark, digits_path):
    return spark.read.parquet(str(digits_path)).limit(600)


@pytest.fixture(scope="module")
def horovod_job(small_df, tmp_path_factory) -> Job:
    """One uninterrupted 2-rank Horovod run of the equivalence job, shared by several tests."""
    require_horovod()
    uri = sqlite_store(tmp_path_factory.mktemp('hvd') / "mlflow.db")
    cfg = job_config(2, uri).replace(**{"backend.name": "horovod"})
    return Job(fit(small_df, cfg), cfg, uri)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


def test_horovod_matches_single_process_reference_and_torch_backend(spark, small_df,
                                                                    horovod_job, tracking_uri):
    assert [r["rank"] for r in horovod_job.result.ranks] == [0, 1]
    hvd_w = final_state(horovod_job.result.run_id, horovod_job.uri)
    ref_w = reference_weights(spark, small_df, horovod_job.cfg)
    diffs = max_diff(hvd_w, ref_w)
    assert max(diffs.values()) <= ATOL, f"Horovod vs single process: {diffs}"

    torch_res = fit(small_df, job_config(2, tracking_uri))
    torch_w = final_state(torch_res.run_id, tracking_uri)
    diffs = max_diff(hvd_w, torch_w)
    assert max(diffs.values()) <= ATOL, f"Horovod vs torch backend: {diffs}"
    assert horovod_job.result.metrics["val/accuracy"] == pytest.approx(
        torch_res.metrics["val/accuracy"], abs=1 / 60)  # at most one of 60 validation rows


def test_adamw_matches_single_process_reference(spark, small_df, tracking_uri):
    """Stateful optimizer with weight decay: a fresh start must not take a hidden first step."""
    require_horovod()
    cfg = job_config(2, tracking_uri).replace(**{
        "backend.name": "horovod", "optimizer.name": "adamw", "optimizer.lr": 0.003,
        "optimizer.weight_decay": 0.05})
    result = fit(small_df, cfg)
    diffs = max_diff(final_state(result.run_id, tracking_uri),
                     reference_weights(spark, small_df, cfg))
    assert max(diffs.values()) <= ATOL, f"Horovod (AdamW) vs single process: {diffs}"


def test_run_records_the_horovod_backend_and_its_settings(horovod_job):
    import horovod

    client = MlflowClient(horovod_job.uri)
    run = client.get_run(horovod_job.result.run_id)
    tags, params = run.data.tags, run.data.params
    assert tags["sparkml_dist.backend"] == "horovod"
    assert tags["horovod.version"] == horovod.__version__ == "0.28.1"
    assert tags["horovod.compression"] == "none"
    assert tags["horovod.backward_passes_per_step"] == "1"
    assert tags["horovod.fusion_threshold_bytes"] == str(64 * 2**20)
    assert params["backend.name"] == "horovod"
    assert params["strategy.compression.name"] == "none"
    # Gradient communication time is measured (synchronize() waits) and reported.
    comm = client.get_metric_history(run.info.run_id, "time/comm_s")
    assert comm and sum(m.value for m in comm) > 0


def test_fp16_compression_trains_digits_to_95_percent(spark, digits_path, tracking_uri):
    require_horovod()
    cfg = load_config(ROOT / "conf/digits.yaml").replace(**{
        "data.source": str(digits_path),
        # The settings this test is about, pinned here even if the demo config changes.
        "model.kwargs": {"hidden": [256, 128]}, "optimizer.name": "adam",
        "optimizer.lr": 0.003, "optimizer.schedule": "cosine", "training.epochs": 20,
        "training.num_workers": 2,
        "backend.name": "horovod", "strategy.compression.name": "fp16",
        "checkpoint.every_steps": 0, "tracking.tracking_uri": tracking_uri,
        "tracking.log_model": False, "tracking.progress": False})
    result = fit(config=cfg, spark=spark)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["data.rows_train"] == "1438"  # the full 1,797 rows, 20% held out
    assert result.metrics["val/accuracy"] >= 0.95, result.metrics
    assert run.data.tags["sparkml_dist.backend"] == "horovod"
    assert run.data.tags["horovod.compression"] == "fp16"
    assert run.data.params["strategy.compression.name"] == "fp16"


@pytest.fixture(scope="module")
def uninterrupted_ft(spark, digits_path, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the fault-tolerance job (Adam, dropout) on Horovod, nothing injected."""
    require_horovod()
    uri = sqlite_store(tmp_path_factory.mktemp('hvd_ft') / "mlflow.db")
    cfg = ft_config(uri, **{"backend.name": "horovod"})
    result = fit(spark.read.parquet(str(digits_path)), cfg)
    assert result.attempts == 1 and result.ranks[0]["resumed_from"] == 0
    return final_state(result.run_id, uri)


def test_lost_worker_resumes_to_the_same_weights_as_an_uninterrupted_run(
        spark, digits_path, uninterrupted_ft, tracking_uri):
    # Adam and dropout: the restored optimizer state and per-step RNG must both carry over.
    die_at = 2 * 23 + 7  # mid-epoch 3 (23 steps per epoch), 3 steps after a checkpoint
    cfg = ft_config(tracking_uri, **{
        "backend.name": "horovod", "fault.max_restarts": 2, "fault.backoff_s": 0.0,
        "fault.inject": {"rank": 1, "step": die_at, "attempt": 0}})
    result = fit(spark.read.parquet(str(digits_path)), cfg)
    assert result.attempts == 2 and all(r["attempt"] == 1 for r in result.ranks)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert "sparkml_dist.failure.0" in run.data.tags
    assert run.data.tags["sparkml_dist.backend"] == "horovod"
    resumed = [r["resumed_from"] for r in result.ranks]
    assert all(die_at - FT_EVERY_STEPS <= s <= die_at for s in resumed), resumed
    assert_bitwise_equal(final_state(result.run_id, tracking_uri), uninterrupted_ft)


# ---------------------------------------------------------------------------------------------
# Pieces that need no Spark


class _NoCommDist:
    """Stands in for ``hvd.DistributedOptimizer`` in one process: gradients are already final."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)


def test_backward_passes_per_step_applies_the_mean_gradient_of_n_passes():
    torch.manual_seed(0)
    xs, ys = torch.randn(4, 8, 3), torch.randn(4, 8, 1)
    model = torch.nn.Linear(3, 1)
    ref = torch.nn.Linear(3, 1)
    ref.load_state_dict(model.state_dict())
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    dist = _NoCommDist(inner)
    opt = HorovodOptimizer(inner, dist, passes_per_step=2)
    for x, y in zip(xs, ys):  # the loop: zero_grad, backward, step, every step
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for k in range(2):  # reference: one step on each pair of batches together
        ref_opt.zero_grad()
        x, y = xs[2 * k:2 * k + 2].reshape(-1, 3), ys[2 * k:2 * k + 2].reshape(-1, 1)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    assert dist.synchronized == 2
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert opt.state_dict()["state"] == inner.state_dict()["state"]


def test_missing_horovod_is_a_deterministic_error_naming_the_build_script(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # makes the import fail
    with pytest.raises(UserCodeError, match=r"horovod.torch cannot be imported.*"
                                            r"scripts/build_horovod.sh"):
        import_horovod(torch.device("cpu"))


def test_cuda_without_nccl_build_says_how_to_rebuild(monkeypatch):
    require_horovod()
    import horovod.torch as hvd

    monkeypatch.setattr(hvd, "nccl_built", lambda: 0)
    with pytest.raises(UserCodeError, match=r"built without it.*HOROVOD_GPU_OPERATIONS=NCCL "
                                            r"scripts/build_horovod.sh"):
        import_horovod(torch.device("cuda", 0))
