"""A rank's shard that cannot fit its Python worker fails on the driver before launch (after the
first pass over the data, before the second), naming the setting to raise or data.spill_dir to
set; lowering data.shard_memory_mb so the rest spills passes the same check."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from sparkml_dist.config import DataConfig, JobConfig
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.driver_checks import (
    WORKER_BASE_MB, check_shard_memory, parse_size_mb, rank_rows)
from sparkml_dist.errors import ConfigError
from tests.conftest import make_session, sqlite_store

ROWS, WIDTH = 20_000, 32  # 1.22 MiB of features per rank with 2 ranks
PER_WORKER_MB = WORKER_BASE_MB + 1  # room for 1 MiB of shard data per Python worker
PYSPARK_MEMORY = f"{int(PER_WORKER_MB)}m"  # each Python worker's own limit: executor cores = 1


@pytest.fixture(scope="module")
def spark():
    session = make_session("local[2]", **{"spark.executor.pyspark.memory": PYSPARK_MEMORY})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def wide_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    cols = {f"f{i}": rng.standard_normal(ROWS).astype(np.float32) for i in range(WIDTH)}
    cols["label"] = rng.integers(0, 10, ROWS)
    path = tmp_path_factory.mktemp("data") / "wide.parquet"
    pq.write_table(pa.table(cols), path)
    return str(path)


def data_cfg(**extra) -> DataConfig:
    return JobConfig().replace(**{"data.feature_cols": [f"f{i}" for i in range(WIDTH)],
                                  **{f"data.{k}": v for k, v in extra.items()}}).data


def test_sizes_and_rows_per_rank():
    assert parse_size_mb("512m") == 512 and parse_size_mb("2g") == 2048
    assert parse_size_mb("1024") == 1024 and parse_size_mb(None) is None
    assert rank_rows(10, DataLayout.one_per_rank(3)) == [4, 4, 4]
    assert rank_rows(10, DataLayout(4, ((0, 1, 2), (3,)))) == [9, 3]


def test_pyspark_memory_too_small_names_the_settings():
    conf = {"spark.executor.pyspark.memory": "1000m", "spark.executor.cores": "2"}.get
    layout = DataLayout.one_per_rank(2)
    with pytest.raises(ConfigError, match=r"rank 0 would hold 2000000 rows x 32 features .*"
                                          r"spark\.executor\.pyspark\.memory=1000m limits each "
                                          r"Python worker to 500 MiB \(divided by "
                                          r"spark\.executor\.cores=2\)\. Raise "
                                          r"spark\.executor\.pyspark\.memory to at least 1350m, "
                                          r"or lower data\.shard_memory_mb to 69\.4 or less"):
        check_shard_memory(data_cfg(), 4_000_000, 32, layout, conf, "spark://h:7077")
    check_shard_memory(data_cfg(shard_memory_mb=64.0), 4_000_000, 32, layout, conf,
                       "spark://h:7077")  # the rest spills: fits
    check_shard_memory(data_cfg(), 4_000_000, 32, layout, {}.get, "spark://h:7077")  # no limit


def test_local_memory_and_spill_disk_are_checked(tmp_path):
    layout = DataLayout.one_per_rank(2)
    need = 2 * (WORKER_BASE_MB + 62) * 2**20
    with pytest.raises(ConfigError, match=r"the 2 ranks on this host .* Lower "
                                          r"data\.shard_memory_mb to [\d.]+ or less .*spill_dir"):
        check_shard_memory(data_cfg(), 1_000_000, 32, layout, {}.get, "local[2]",
                           memory_bytes=int(need))
    spill = data_cfg(shard_memory_mb=16.0, spill_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=rf"spill 90 MiB of features to {tmp_path}, which has "
                                          r"50 MiB free\. Set data\.spill_dir"):
        check_shard_memory(spill, 1_000_000, 32, layout, {}.get, "local[2]",
                           memory_bytes=int(need), disk_bytes=50 * 2**20)
    check_shard_memory(spill, 1_000_000, 32, layout, {}.get, "local[2]", memory_bytes=int(need),
                       disk_bytes=300 * 2**20)


def test_fit_fails_before_launch_naming_the_setting(spark, wide_path, tmp_path):
    from sparkml_dist import fit

    uri = sqlite_store(tmp_path / "mlflow.db")
    cfg = JobConfig().replace(**{"data.feature_cols": [f"f{i}" for i in range(WIDTH)],
                                 "training.num_workers": 2, "tracking.tracking_uri": uri})
    with pytest.raises(ConfigError, match=rf"rank \d would hold 10000 rows x 32 features .*"
                                          rf"spark\.executor\.pyspark\.memory={PYSPARK_MEMORY} "
                                          r".*lower data\.shard_memory_mb to 0\.[6-8]"):
        fit(wide_path, cfg, spark=spark)
    client = MlflowClient(uri)  # no run was created
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_lower_shard_memory_budget_passes_the_check(spark, wide_path):
    from sparkml_dist.spark.prepare import prepare, read_source

    cfg = data_cfg(source=wide_path, shard_memory_mb=0.5)
    prepared = prepare(spark, read_source(spark, cfg), cfg, DataLayout.one_per_rank(2), 0)
    try:
        assert sum(prepared.train_shard_sizes) + sum(prepared.val_shard_sizes) == ROWS
    finally:
        prepared.release()


def test_the_check_divides_pyspark_memory_as_spark_does(spark):
    """Spark's own per-worker limit (what the Python worker is told) equals the check's."""
    import os

    from sparkml_dist.driver_checks import _worker_slots

    seen = spark.sparkContext.parallelize(range(2), 2).map(
        lambda _: os.environ.get("PYSPARK_EXECUTOR_MEMORY_MB")).collect()
    conf = spark.sparkContext.getConf().get
    assert seen == [str(int(parse_size_mb(PYSPARK_MEMORY) / _worker_slots(conf)))] * 2
