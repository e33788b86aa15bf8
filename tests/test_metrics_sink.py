"""Rank 0's metric sink: reports coalesced into few ``log_batch`` calls, nothing lost or moved.

A real SQLite MLflow store; the client's ``log_batch`` is wrapped only to count the calls.
"""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist.tracking.mlflow_store import MlflowSink
from tests.conftest import sqlite_store


@pytest.fixture()
def run(tmp_path):
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("sink")
    return uri, client, client.create_run(exp).info.run_id


def _counting(sink: MlflowSink) -> list[int]:
    sizes: list[int] = []
    real = sink.client.log_batch

    def log_batch(run_id, metrics=(), **kw):
        sizes.append(len(metrics))
        return real(run_id, metrics=metrics, **kw)

    sink.client.log_batch = log_batch  # type: ignore[method-assign]
    return sizes


def test_reports_within_the_interval_go_out_together_with_their_own_steps(run):
    uri, client, run_id = run
    sink = MlflowSink(uri, run_id, interval_s=2.0)
    calls = _counting(sink)
    stamps = []
    for step in range(1, 31):
        sink.log_metrics({"train/loss": 1.0 / step, "time/step_s": 0.01 * step}, step * 10)
        stamps.append(int(time.time() * 1000))
        time.sleep(0.01)
    sink.flush()
    assert sum(calls) == 60
    assert len(calls) <= 3, f"30 reports within 2 s took {len(calls)} log_batch calls"
    hist = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == [s * 10 for s in range(1, 31)]
    assert [m.value for m in hist] == pytest.approx([1.0 / s for s in range(1, 31)])
    for m, stamp in zip(hist, stamps):  # the time of the report, not of the write
        assert stamp - 100 <= m.timestamp <= stamp


def test_flush_writes_at_once_and_large_writes_are_split(run):
    uri, client, run_id = run
    sink = MlflowSink(uri, run_id, interval_s=60.0)
    calls = _counting(sink)
    sink.log_metrics({"a": 1.0}, 1)  # the first report goes out at once
    time.sleep(0.3)
    for step in range(2, 17):
        sink.log_metrics({f"m{i}": float(i) for i in range(100)}, step)
    t0 = time.monotonic()
    sink.flush()
    assert time.monotonic() - t0 < 10, "flush waited out the 60 s interval"
    assert calls[0] == 1 and sum(calls[1:]) == 1500 and max(calls) <= 1000
    assert len(client.get_metric_history(run_id, "m7")) == 15


def test_a_failing_store_is_reported_by_the_next_call(run):
    uri, _, _ = run
    sink = MlflowSink(uri, "0" * 32, interval_s=0.1)  # no such run
    sink.log_metrics({"a": 1.0}, 1)
    with pytest.raises(RuntimeError, match="logging metrics to MLflow failed"):
        sink.flush()
    with pytest.raises(RuntimeError, match="logging metrics to MLflow failed"):
        sink.log_metrics({"a": 2.0}, 2)


def test_flush_is_bounded_when_the_store_does_not_answer(run):
    uri, _, run_id = run
    sink = MlflowSink(uri, run_id, interval_s=0.0)
    real = sink.client.log_batch

    def stuck(*args, **kwargs):
        time.sleep(3.0)
        return real(*args, **kwargs)

    sink.client.log_batch = stuck  # type: ignore[method-assign]
    sink.log_metrics({"a": 1.0}, 1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not stored in MLflow within 0.5 s"):
        sink.flush(timeout_s=0.5)
    assert time.monotonic() - t0 < 2.5
    sink.flush()  # the write still lands once the store answers
