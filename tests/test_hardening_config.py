"""Bad settings are caught on the driver before launch, with the valid range named; secrets stay
out of the run; a resume into another schedule or of a finished run is refused."""

import json
import math
import os

import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist.config import JobConfig, to_dict
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.driver_checks import FAULT_INJECTION_ENV, check_environment, check_prepared
from sparkml_dist.errors import CheckpointError, ConfigError
from sparkml_dist.strategies import job_fingerprint
from sparkml_dist.tracking.redact import REDACTED, redact_uri
from sparkml_dist.tracking.run import JobRun
from sparkml_dist.training.checkpoint import CheckpointMeta, check_fingerprint

from tests.conftest import sqlite_store


@pytest.mark.parametrize("key, value, message", [
    ("training.seed", -1, r"training\.seed must be in \[0, 2\^63\).*got -1"),
    ("training.seed", 2**63, r"training\.seed must be in \[0, 2\^63\)"),
    ("optimizer.weight_decay", -0.1, r"optimizer\.weight_decay must be finite and >= 0"),
    ("optimizer.momentum", -0.9, r"optimizer\.momentum must be finite and >= 0"),
    ("optimizer.gamma", -0.5, r"optimizer\.gamma .* must be finite and > 0"),
    ("optimizer.lr", math.inf, r"optimizer\.lr must be finite and > 0; got inf"),
    ("optimizer.lr", math.nan, r"optimizer\.lr must be finite"),
    ("backend.timeout_s", math.inf, r"backend\.timeout_s .* must be finite"),
    ("data.shard_memory_mb", math.nan, r"data\.shard_memory_mb must be finite"),
    ("fault.backoff_s", math.inf, r"fault\.backoff_s finite"),
    ("backend.fusion_threshold_mb", math.nan, r"backend\.fusion_threshold_mb must be finite"),
    ("tracking.progress_interval_s", 0.0, r"tracking\.progress_interval_s must be finite and > 0"),
    ("tracking.progress_interval_s", -1.0, r"tracking\.progress_interval_s"),
    ("fault.deadline_s", 0.0, r"fault\.deadline_s must be unset or finite and > 0"),
    ("fault.deadline_s", math.inf, r"fault\.deadline_s must be unset or finite"),
    ("checkpoint.upload_timeout_s", 0.0, r"checkpoint\.upload_timeout_s must be a finite .*> 0"),
    ("checkpoint.upload_timeout_s", math.nan, r"checkpoint\.upload_timeout_s must be a finite"),
])
def test_out_of_range_settings_fail_naming_the_range(key, value, message):
    with pytest.raises(ConfigError, match=message):
        JobConfig().replace(**{key: value})


def test_edges_of_the_ranges_are_accepted():
    cfg = JobConfig().replace(**{"training.seed": 2**63 - 1, "optimizer.weight_decay": 0.0,
                                 "optimizer.momentum": 0.0, "tracking.progress_interval_s": 0.01})
    assert cfg.training.seed == 2**63 - 1


def test_label_among_the_features_is_refused():
    with pytest.raises(ConfigError, match=r"data\.label_col 'y' is also a feature column"):
        JobConfig().replace(**{"data.feature_cols": ["a", "y"], "data.label_col": "y"})
    with pytest.raises(ConfigError, match="also a feature column"):
        JobConfig().replace(**{"data.features_col": "y", "data.label_col": "y"})


def test_fault_injection_outside_tests_is_refused(monkeypatch):
    cfg = JobConfig().replace(**{"fault.inject": {"rank": 1, "step": 3}})
    check_environment(cfg, "local[2]")  # under pytest: allowed
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.delenv(FAULT_INJECTION_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"fault\.inject=.* is for tests only"):
        check_environment(cfg, "local[2]")
    check_environment(JobConfig(), "local[2]")  # nothing injected: fine
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")
    check_environment(cfg, "local[2]")


def test_spill_dir_must_exist_and_be_writable(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"data\.spill_dir=.*nope' does not exist"):
        check_environment(JobConfig().replace(**{"data.spill_dir": str(missing)}), "local[2]")
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_environment(JobConfig().replace(**{"data.spill_dir": str(a_file)}), "local[2]")
    check_environment(JobConfig().replace(**{"data.spill_dir": str(tmp_path)}), "local[2]")


def test_batch_larger_than_smallest_shard_is_refused():
    cfg = JobConfig().replace(**{"training.batch_size": 64})
    check_prepared(cfg, (64, 100), (0, 1))
    with pytest.raises(ConfigError, match=r"training\.batch_size=64 is larger than the smallest "
                                          r"training shard \(63 rows"):
        check_prepared(cfg, (100, 63), (0, 1))


def test_continuous_float_label_under_classification_is_refused():
    cfg = JobConfig()
    floats = tuple(i / 7 for i in range(1500))
    with pytest.raises(ConfigError, match=r"is a float with 1500 distinct values .* "
                                          r"data\.task=regression"):
        check_prepared(cfg, (100, 100), floats)
    check_prepared(cfg.replace(**{"data.allow_float_classes": True}), (100, 100), floats)
    check_prepared(cfg, (100, 100), tuple(float(i) for i in range(1500)))  # whole numbers: ids
    check_prepared(cfg, (100, 100), floats[:10])


@pytest.mark.parametrize("key, value", [("training.batch_size", 16),
                                        ("model.factory", "tests.factories:other"),
                                        ("model.kwargs", {"hidden": [8]})])
def test_resume_with_another_schedule_or_model_fails_with_the_difference(key, value):
    layout = DataLayout.one_per_rank(2)
    saved = JobConfig()
    # The fingerprint travels through meta.json: compare the JSON round trip, as a resume does.
    meta = CheckpointMeta.from_json(CheckpointMeta(
        steps_done=5, epoch=0, step_in_epoch=5,
        fingerprint=job_fingerprint(saved, layout)).to_json())
    check_fingerprint("ckpt-5", meta.fingerprint, job_fingerprint(saved, layout))
    with pytest.raises(CheckpointError, match=rf"{key}: .* -> "):
        check_fingerprint("ckpt-5", meta.fingerprint,
                          job_fingerprint(saved.replace(**{key: value}), layout))


def test_uri_passwords_are_redacted():
    assert redact_uri("https://alice:s3cr%40t@mlflow.example:5000/x") == \
        f"https://alice:{REDACTED}@mlflow.example:5000/x"
    assert redact_uri("postgresql://u:p@db/mlflow?x=1") == f"postgresql://u:{REDACTED}@db/mlflow?x=1"
    assert redact_uri("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"
    assert redact_uri("http://host:5000/") == "http://host:5000/"


def test_secrets_never_reach_the_runs_params_or_config_artifact(tmp_path, monkeypatch):
    uri = sqlite_store(tmp_path / "mlflow.db")
    cfg = JobConfig().replace(**{
        "tracking.tracking_uri": uri,
        "data.source": "jdbc://reader:hunter2@db.example/sales",
        "data.read_options": {"user": "reader", "password": "hunter2",
                              "fs.s3a.access.key": "AKIAEXAMPLE", "header": "true"}})
    run = JobRun(cfg)
    client = MlflowClient(uri)
    params = client.get_run(run.run_id).data.params
    artifact = client.download_artifacts(run.run_id, "config/resolved.json", str(tmp_path))
    stored = json.loads(open(artifact).read())
    for text in (json.dumps(params), json.dumps(stored)):
        assert "hunter2" not in text and "AKIAEXAMPLE" not in text
        assert REDACTED in text
    assert stored["data"]["read_options"]["header"] == "true"
    assert stored["data"]["read_options"]["user"] == "reader"
    assert params["data.source"] == f"jdbc://reader:{REDACTED}@db.example/sales"
    assert to_dict(cfg)["data"]["read_options"]["password"] == "hunter2"  # the job keeps it


def test_resuming_a_finished_run_is_refused(tmp_path):
    cfg = JobConfig().replace(**{"tracking.tracking_uri": sqlite_store(tmp_path / "mlflow.db")})
    run = JobRun(cfg)
    run.finish()
    with pytest.raises(ConfigError, match=rf"run {run.run_id} is FINISHED.*Start a new run"):
        JobRun(cfg, run.run_id)
    failed = JobRun(cfg)
    failed.finish("FAILED")
    assert JobRun(cfg, failed.run_id).run_id == failed.run_id  # a failed run resumes


def test_a_run_with_a_live_driver_is_not_resumed_unless_forced(tmp_path):
    import subprocess
    import sys

    from sparkml_dist.tracking.run import HEARTBEAT_STALE_S, HEARTBEAT_TAG

    cfg = JobConfig().replace(**{"tracking.tracking_uri": sqlite_store(tmp_path / "mlflow.db")})
    live = JobRun(cfg)
    live.start_heartbeat(interval_s=0.5)
    with pytest.raises(ConfigError, match=rf"run {live.run_id} is RUNNING and its driver was "
                                          r"alive \d+ s ago.*force_resume=True"):
        JobRun(cfg, live.run_id)
    assert JobRun(cfg, live.run_id, force_resume=True).run_id == live.run_id
    live.stop_heartbeat()
    client = MlflowClient(cfg.tracking.tracking_uri)
    # A driver on this host whose process is gone: resumable at once.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    beat = json.loads(client.get_run(live.run_id).data.tags[HEARTBEAT_TAG])
    client.set_tag(live.run_id, HEARTBEAT_TAG, json.dumps({**beat, "pid": int(gone.stdout)}))
    assert JobRun(cfg, live.run_id).run_id == live.run_id
    # A driver elsewhere: resumable once its heartbeat is stale.
    client.set_tag(live.run_id, HEARTBEAT_TAG, json.dumps({**beat, "host": "elsewhere"}))
    with pytest.raises(ConfigError, match="is RUNNING and its driver was alive"):
        JobRun(cfg, live.run_id)
    old = {**beat, "host": "elsewhere", "time": beat["time"] - HEARTBEAT_STALE_S - 1}
    client.set_tag(live.run_id, HEARTBEAT_TAG, json.dumps(old))
    assert JobRun(cfg, live.run_id).run_id == live.run_id
