"""The strategy seam through real Spark and a real MLflow store: bad pairings fail on the driver
before launch, a compressed job's per-rank checkpoint parts live in the run and a lost worker
resumes bitwise, and a resume into other settings or from an unsafe checkpoint is refused."""

import io
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sparkml_dist import fit
from sparkml_dist.errors import CheckpointError, ConfigError, UserCodeError
from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore
from sparkml_dist.tracking.run import JobRun
from sparkml_dist.training.checkpoint import SHARED_PART, dir_name
from tests.conftest import sqlite_store
from tests.test_fault_tolerance import assert_bitwise_equal, ft_config


@pytest.fixture(scope="module")
def digits_df(spark, digits_path):
    return spark.read.parquet(str(digits_path)).limit(800)


@pytest.mark.parametrize("overrides, expected", [
    ({"backend.name": "horovod", "strategy.compression.name": "powersgd"},
     r"strategy.compression.name=powersgd needs DDP communication hooks .* backend.name=horovod "
     r"does not provide. Change strategy.compression.name, or set backend.name to one of: torch"),
    ({"backend.name": "horovod", "strategy.compression.name": "topk"},
     r"strategy.compression.name=topk needs .* set backend.name to one of: torch"),
    ({"backend.name": "horovod", "strategy.comm_timing_every_steps": 5},
     r"strategy.comm_timing_every_steps applies to backend.name=torch"),
])
def test_bad_pairing_fails_on_the_driver_before_launch(digits_df, tracking_uri, overrides,
                                                       expected):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=expected):
        fit(digits_df, ft_config(tracking_uri, **overrides))
    assert time.monotonic() - t0 < 5
    client = MlflowClient(tracking_uri)
    assert client.search_experiments(filter_string="name = 'sparkml_dist'") == [], \
        "nothing may be launched or recorded for a rejected config"


@pytest.fixture(scope="module")
def topk_clean(digits_df, tmp_path_factory):
    uri = sqlite_store(tmp_path_factory.mktemp('topk') / "mlflow.db")
    result = fit(digits_df, ft_config(uri, **{"strategy.compression.name": "topk",
                                              "strategy.compression.topk_ratio": 0.05}))
    return uri, result


def test_compressed_job_stores_per_rank_parts_and_logs_wire_bytes(topk_clean):
    uri, result = topk_clean
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.params["strategy.compression.name"] == "topk"
    assert run.data.tags["sparkml_dist.strategy"] == "data_parallel"
    assert run.data.tags["sparkml_dist.resume_guarantee"] == "bitwise"
    ratio = client.get_metric_history(result.run_id, "comm/compression_ratio")
    assert ratio and min(m.value for m in ratio) > 5
    ckpts = sorted(f.path for f in client.list_artifacts(result.run_id, "checkpoints"))
    files = {Path(f.path).name for f in client.list_artifacts(result.run_id, ckpts[-1])}
    assert files == {"meta.json", SHARED_PART, "rank-00000.pt", "rank-00001.pt"}


def test_lost_worker_with_topk_resumes_bitwise(digits_df, tracking_uri, topk_clean):
    uri, clean = topk_clean
    cfg = ft_config(tracking_uri, **{"strategy.compression.name": "topk",
                                     "strategy.compression.topk_ratio": 0.05,
                                     "fault.inject": {"rank": 1, "step": 23, "attempt": 0}})
    result = fit(digits_df, cfg)
    assert result.attempts == 2 and result.ranks[0]["resumed_from"] == 20
    from sparkml_dist import final_state

    assert_bitwise_equal(final_state(result.run_id, tracking_uri),
                         final_state(clean.run_id, uri))


def test_resume_with_other_strategy_settings_fails_on_the_driver(digits_df, topk_clean):
    uri, clean = topk_clean
    # A FINISHED run is refused before its checkpoints are read: resume it as an interrupted one.
    MlflowClient(uri).set_terminated(clean.run_id, "KILLED")
    with pytest.raises(CheckpointError, match=r"compression: 'topk' -> 'none'"):
        fit(digits_df, ft_config(uri), resume_run_id=clean.run_id)


def test_checkpoint_carrying_pickled_code_is_refused(digits_df, tracking_uri):
    """A checkpoint whose shared part would run code when unpickled (with a matching meta.json)
    stops the job as a user error instead of executing it."""
    run = JobRun(ft_config(tracking_uri))
    store = MlflowCheckpointStore(tracking_uri, run.run_id)

    class Exploit:
        def __reduce__(self):
            return (exec, ("open('/tmp/sparkml_dist_pwned', 'w').write('x')",))

    buf = io.BytesIO()
    torch.save({"model": Exploit()}, buf)
    import hashlib

    from sparkml_dist.training.checkpoint import CheckpointMeta

    data = buf.getvalue()
    store.write_part(dir_name(5), SHARED_PART, data)
    from sparkml_dist.data.layout import DataLayout
    from sparkml_dist.strategies import job_fingerprint

    store.commit(dir_name(5), CheckpointMeta(
        steps_done=5, epoch=0, step_in_epoch=5,
        fingerprint=job_fingerprint(ft_config(tracking_uri), DataLayout.one_per_rank(2)),
        parts={SHARED_PART: {"sha256": hashlib.sha256(data).hexdigest(),
                             "size_bytes": len(data)}}))
    Path("/tmp/sparkml_dist_pwned").unlink(missing_ok=True)
    with pytest.raises((CheckpointError, UserCodeError), match="refused"):
        fit(digits_df, ft_config(tracking_uri), resume_run_id=run.run_id)
    assert not Path("/tmp/sparkml_dist_pwned").exists()
