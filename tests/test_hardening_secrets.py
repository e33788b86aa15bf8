"""A tracking URI's password and a read option's secret never reach an error, a log line, or the
run's params, tags and artifacts: every message that quotes them goes through the redactor."""

import json
import logging

from mlflow.tracking import MlflowClient

from sparkml_dist.config import JobConfig
from sparkml_dist.spark import probe
from sparkml_dist.spark.launch import describe_failure
from sparkml_dist.spark.preflight import compare_reports, local_store_problem
from sparkml_dist.tracking.redact import REDACTED, Redactor, redact_uri
from sparkml_dist.tracking.run import JobRun
from tests.conftest import sqlite_store
from tests.ranks import free_port

SECRET = "hunter2pw"
SERVER = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"  # nothing listens there


def test_secret_query_parameters_are_redacted():
    url = f"jdbc:postgresql://db/sales?user=reader&password={SECRET}&ssl=true"
    assert redact_uri(url) == f"jdbc:postgresql://db/sales?user=reader&password={REDACTED}&ssl=true"
    assert redact_uri("s3://bucket/x?versionId=3") == "s3://bucket/x?versionId=3"


def test_the_redactor_removes_a_jobs_own_secret_values_from_free_text():
    cfg = JobConfig().replace(**{"data.read_options": {"password": SECRET, "user": "reader"},
                                 "tracking.tracking_uri": SERVER})
    from sparkml_dist.config import to_dict

    r = Redactor(to_dict(cfg))
    text = r.text(f"java.sql.SQLException: login failed for reader/{SECRET} at {SERVER}/api")
    assert SECRET not in text and "reader" in text and REDACTED in text
    nested = r.value({"error": f"x {SECRET}", "detail": [SERVER], "rank": 1})
    assert SECRET not in json.dumps(nested) and nested["rank"] == 1


def test_preflight_messages_quote_uris_without_their_password():
    problem = local_store_problem(SERVER, "spark://head:7077", "file:///mnt/mlruns")
    assert problem and "artifact location file:///mnt/mlruns" in problem
    assert SECRET not in problem and f"alice:{REDACTED}@127.0.0.1" in problem
    problem = local_store_problem(f"file://alice:{SECRET}@nas/mlruns", "yarn")
    assert problem and SECRET not in problem
    # An executor that cannot reach the server quotes the URI it was given; the driver's
    # summary of its report (the pre-flight error) does not.
    report = probe.report((), SERVER)
    assert SECRET in report["tracking_error"]  # the real probe, against a closed port
    problems = compare_reports({}, report["python_version"], [report])
    assert problems and "cannot reach the tracking server" in problems[0]
    assert SECRET not in problems[0]


def test_a_failed_attempt_reaches_logs_and_the_run_without_secrets(tmp_path, caplog):
    uri = sqlite_store(tmp_path / "mlflow.db")
    cfg = JobConfig().replace(**{"tracking.tracking_uri": uri,
                                 "data.read_options": {"password": SECRET}})
    exc = RuntimeError(f"sparkml_dist rank 0 attempt 0 failed: MlflowException: API request to "
                       f"{SERVER}/api/2.0/mlflow/runs/log-batch failed; the JDBC reader said "
                       f"'bad password {SECRET}'\n\tat org.apache.spark...")
    failure = describe_failure(exc, 0)
    assert f"alice:{SECRET}@" not in json.dumps(failure)  # URIs: redacted at the source
    run = JobRun(cfg)
    with caplog.at_level(logging.DEBUG):
        failure = run.redactor.value(failure)  # what the attempt loop logs and raises
        logging.getLogger("sparkml_dist.spark.launch").error("attempt 0 failed: %s",
                                                             failure["error"])
        run.log_failure(0, failure)
        run.set_tags({"note": f"from {SERVER}"})
        run.log_params({"data.note": f"pw {SECRET}"})
    client = MlflowClient(uri)
    data = client.get_run(run.run_id).data
    stored = open(client.download_artifacts(run.run_id, "failures/attempt-0.json",
                                            str(tmp_path))).read()
    for text in (json.dumps(data.tags), json.dumps(data.params), stored, caplog.text):
        assert SECRET not in text
    assert REDACTED in data.tags["sparkml_dist.failure.0"] and REDACTED in stored


def test_a_ranks_failure_text_is_redacted_before_spark_logs_it():
    from sparkml_dist.spark.task import TaskSpec, _redacted
    from sparkml_dist.training.loop import RankPlan

    cfg = JobConfig().replace(**{"data.read_options": {"token": SECRET}})
    spec = TaskSpec(config=cfg, plan=RankPlan(in_features=2, num_outputs=2,
                                              train_shard_sizes=(4, 4)),
                    run_id="r", tracking_uri=SERVER, secret="rendezvous-key")
    text = _redacted(spec, f"rank 0 failed: cannot log to {SERVER}: token {SECRET} refused, "
                           "key rendezvous-key")
    assert SECRET not in text and "rendezvous-key" not in text and text.count(REDACTED) == 3


def test_a_model_that_cannot_be_resolved_is_named_without_the_stores_password(monkeypatch):
    import pytest

    from sparkml_dist.errors import ConfigError
    from sparkml_dist.inference import resolve_model

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # nothing listens: fail at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(ConfigError) as info:
        resolve_model("runs:/0123456789abcdef/model", tracking_uri=SERVER)
    text = str(info.value)
    assert "cannot load model 'runs:/0123456789abcdef/model'" in text
    assert SECRET not in text and REDACTED in text
    assert info.value.__cause__ is None and info.value.__suppress_context__  # MLflow's text, too
