"""Through real Spark, on a session that authenticates and encrypts its RPC: unencrypted
collectives are refused unless allowed; with the opt-in, ranks meet over the sealed rendezvous
on the chosen interface; the run's status is right when the job fails before training or is
interrupted."""

import logging
import os
import signal
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist import JobConfig, fit
from sparkml_dist.errors import CheckpointError, ConfigError, TrainingFailed
from sparkml_dist.tracking.run import ATTEMPTS_TAG
from tests.conftest import make_session


@pytest.fixture(scope="module")
def spark():
    session = make_session(**{"spark.authenticate": "true",
                              "spark.network.crypto.enabled": "true"})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def digits_df(spark, digits_path):
    return spark.read.parquet(str(digits_path))


def config(uri: str, **extra) -> JobConfig:
    return JobConfig().replace(**{
        "data.features_col": "features", "model.kwargs": {"hidden": [32]}, "optimizer.lr": 0.01,
        "training.num_workers": 2, "training.batch_size": 32, "training.epochs": 1,
        "training.log_every_steps": 5, "checkpoint.every_steps": 10,
        "fault.max_restarts": 0, "fault.backoff_s": 0.0,
        "tracking.tracking_uri": uri, "tracking.log_model": False, "tracking.progress": False,
        "backend.allow_unencrypted": True, "backend.socket_ifname": "lo", **extra})


def test_encrypted_cluster_refuses_unencrypted_collectives_before_launch(digits_df, tracking_uri):
    with pytest.raises(ConfigError, match=r"spark\.network\.crypto\.enabled=true.*"
                                          r"backend\.allow_unencrypted=true"):
        fit(digits_df, config(tracking_uri, **{"backend.allow_unencrypted": False}))
    client = MlflowClient(tracking_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("rendezvous", ["auto", "barrier"])
def test_ranks_meet_over_the_sealed_rendezvous_on_the_chosen_interface(
        digits_df, tracking_uri, rendezvous, caplog):
    # auto: rank 0's address through the driver's board; barrier: through allGather.
    with caplog.at_level(logging.INFO, logger="sparkml_dist.spark.rendezvous"):
        result = fit(digits_df, config(tracking_uri, **{"backend.rendezvous": rendezvous}))
    assert result.attempts == 1 and len(result.ranks) == 2
    assert result.metrics["val/accuracy"] > 0.5
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["backend.socket_ifname"] == "lo"
    assert run.data.params["backend.rendezvous"] == rendezvous
    on_board = "ranks meet at the driver's rendezvous board" in caplog.text
    assert on_board == (rendezvous == "auto"), caplog.text


def test_failure_before_training_marks_the_run_failed(digits_df, tracking_uri):
    # A job that dies on its only attempt leaves a FAILED run with checkpoints.
    with pytest.raises(TrainingFailed):
        fit(digits_df, config(tracking_uri, **{"fault.inject": {"rank": 1, "step": 15}}))
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    # Resuming it with another batch size fails on the driver, before training, naming the
    # difference; the resumed run does not stay RUNNING.
    with pytest.raises(CheckpointError, match=r"training\.batch_size: 32 -> 16"):
        fit(digits_df, config(tracking_uri, **{"training.batch_size": 16}),
            resume_run_id=run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_ctrl_c_marks_the_run_killed(digits_df, tracking_uri):
    client = MlflowClient(tracking_uri)

    def interrupt_once_training_runs() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and ATTEMPTS_TAG in runs[0].data.tags:
                time.sleep(2.0)  # the barrier stage is running
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    threading.Thread(target=interrupt_once_training_runs, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        fit(digits_df, config(tracking_uri, **{"training.epochs": 50}))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"


def test_job_deadline_cancels_the_training_jobs(digits_df, tracking_uri):
    with pytest.raises(TrainingFailed, match=r"fault\.deadline_s=20 s; its Spark jobs were "
                                             r"cancelled"):
        fit(digits_df, config(tracking_uri, **{"training.epochs": 500, "fault.max_restarts": 2,
                                               "fault.deadline_s": 20.0}))
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert run.data.tags["sparkml_dist.failure.0"].startswith("deadline")
    assert run.data.tags[ATTEMPTS_TAG] == "1"  # no relaunch after the deadline
    # From the run's creation (after preparation) to its end: the deadline plus a quick cancel.
    took = (run.info.end_time - run.info.start_time) / 1000
    assert took < 20 + 90, took
    # The session is usable afterwards: nothing of the cancelled stage is left running.
    assert digits_df.count() == 1797
