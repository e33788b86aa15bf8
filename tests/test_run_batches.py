"""The run's tags and params are each written with one ``log_batch``: more than MLflow's store
takes in one call all arrive (its client splits the batch), a param the run already has keeps
its value, and nothing to write is no error."""

from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

from sparkml_dist.config import JobConfig
from sparkml_dist.tracking.run import JobRun
from tests.conftest import sqlite_store


def test_more_tags_and_params_than_one_batch_holds_all_reach_the_run(tmp_path):
    uri = sqlite_store(tmp_path / "mlflow.db")
    run = JobRun(JobConfig().replace(**{"tracking.tracking_uri": uri}))
    n = 2 * MAX_PARAMS_TAGS_PER_BATCH + 7
    run.set_tags({f"extra.tag{i}": i for i in range(n)})
    run.log_params({f"extra.param{i}": i for i in range(n)})
    run.log_params({"extra.param0": "changed", "extra.late": "x"})  # as a resumed run does
    data = MlflowClient(uri).get_run(run.run_id).data
    assert {k: v for k, v in data.tags.items() if k.startswith("extra.")} == \
        {f"extra.tag{i}": str(i) for i in range(n)}
    assert {k: v for k, v in data.params.items() if k.startswith("extra.")} == \
        {**{f"extra.param{i}": str(i) for i in range(n)}, "extra.late": "x"}
    run.set_tags({})
    run.log_params({})
