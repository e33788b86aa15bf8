"""N-rank training ends with the same weights as one process over the same global batches."""

import pytest
import torch
from pyspark.sql import functions as F

from sparkml_dist import JobConfig, final_state, fit
from sparkml_dist.data.shard_store import FEATURES, LABEL, ROW, SHARD, SPLIT
from sparkml_dist.data.sharding import batch_indices, epoch_order, steps_per_epoch
from sparkml_dist.models import build_model
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.spark.prepare import prepare
from sparkml_dist.training.optim import make_optimizer, make_scheduler

SPARK_MASTER = "local[3]"
ATOL = 1e-5


def job_config(num_workers: int, tracking_uri: str) -> JobConfig:
    return JobConfig().replace(**{
        "data.features_col": "features", "data.val_fraction": 0.1,
        "model.factory": "sparkml_dist.models:mlp", "model.kwargs": {"hidden": [32]},
        "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.momentum": 0.9,
        "optimizer.schedule": "cosine", "optimizer.warmup_steps": 3,
        "training.num_workers": num_workers, "training.batch_size": 16, "training.epochs": 2,
        "training.seed": 11, "training.log_every_steps": 5,
        "checkpoint.every_steps": 0, "fault.max_restarts": 0,
        "tracking.tracking_uri": tracking_uri, "tracking.log_model": False,
        "tracking.progress": False,
    })


def reference_weights(spark, df, cfg: JobConfig) -> dict[str, torch.Tensor]:
    """Single process: each step's global batch is every rank's batch concatenated, in order."""
    tc = cfg.training
    prepared = prepare(spark, df, cfg.data, DataLayout.one_per_rank(tc.num_workers), tc.seed)
    rows = prepared.frame.where(F.col(SPLIT) == 0).select(FEATURES, LABEL, ROW, SHARD).collect()
    prepared.release()
    shards = []
    for r in range(tc.num_workers):
        mine = sorted((row for row in rows if row[SHARD] == r), key=lambda row: row[ROW])
        shards.append((torch.tensor([row[FEATURES] for row in mine], dtype=torch.float32),
                       torch.tensor([row[LABEL] for row in mine], dtype=torch.long)))
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model.factory, prepared.in_features, prepared.num_outputs,
                        cfg.model.kwargs)
    steps = steps_per_epoch([len(y) for _, y in shards], tc.batch_size)
    opt = make_optimizer(cfg.optimizer, model.parameters())
    sched = make_scheduler(cfg.optimizer, opt, steps, steps * tc.epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(tc.epochs):
        orders = [epoch_order(len(y), tc.seed, epoch, r, steps * tc.batch_size)
                  for r, (_, y) in enumerate(shards)]
        for s in range(steps):
            idx = [torch.as_tensor(batch_indices(o, s, tc.batch_size)) for o in orders]
            x = torch.cat([shards[r][0][i] for r, i in enumerate(idx)])
            y = torch.cat([shards[r][1][i] for r, i in enumerate(idx)])
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
    return model.state_dict()


@pytest.mark.parametrize("num_workers", [2, 3])
def test_distributed_weights_match_single_process(spark, digits_path, tracking_uri, num_workers):
    df = spark.read.parquet(str(digits_path)).limit(600)
    cfg = job_config(num_workers, tracking_uri)
    result = fit(df, cfg)
    assert [r["rank"] for r in result.ranks] == list(range(num_workers))
    distributed = final_state(result.run_id, tracking_uri)
    reference = reference_weights(spark, df, cfg)
    assert distributed.keys() == reference.keys()
    for name, ref in reference.items():
        diff = (distributed[name] - ref).abs().max().item()
        assert diff <= ATOL, f"{name}: max |distributed - reference| = {diff:.2e} > {ATOL}"
    # The reference really trained: weights moved away from the initialisation.
    torch.manual_seed(cfg.training.seed)
    init = build_model(cfg.model.factory, 64, 10, cfg.model.kwargs).state_dict()
    assert max((init[k] - reference[k]).abs().max().item() for k in init) > 1e-2
