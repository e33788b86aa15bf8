"""The rank loop's batch feed, and one rank-loop body over cpu/gloo and cuda/nccl."""

import numpy as np
import pytest
import torch

from sparkml_dist.training.feed import BatchFeed, choose_mode
from tests.ranks import digits, final_model, rank_stores, reference_weights, run_ranks
from tests.test_compression import job

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def _order(n, batch):
    rng = np.random.default_rng(0)
    perms = [rng.permutation(n) for _ in range(3)]
    return lambda step: perms[step // 4][(step % 4) * batch:(step % 4 + 1) * batch]


@pytest.mark.parametrize("device, mode", [
    ("cpu", "host"),
    pytest.param("cuda", "resident", marks=CUDA),
    pytest.param("cuda", "prefetch", marks=CUDA),
])
def test_every_feed_yields_exactly_the_rows_of_the_data_order(device, mode):
    train, _ = rank_stores(digits(400), 0, 1)
    indices = _order(len(train), 16)
    feed = BatchFeed(train, torch.device(device), indices, mode)
    got = list(feed.batches(2, 12))
    assert len(got) == 10
    for step, (x, y) in zip(range(2, 12), got):
        ex, ey = train.gather(indices(step))
        assert x.device.type == device and torch.equal(x.cpu(), ex) and torch.equal(y.cpu(), ey)


def test_cpu_always_gathers_on_the_host():
    train, _ = rank_stores(digits(100), 0, 1)
    assert choose_mode(train, torch.device("cpu"), 0.5, True) == "host"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_rank_loop_matches_the_reference_on_each_device(device, tmp_path):
    """One body for cpu/gloo and cuda/nccl: a one-rank group (NCCL on a GPU, gloo on CPU) runs
    the real loop and ends where the single-process CPU reference does."""
    data = digits(600)
    cfg = job(1, epochs=2, **{"backend.device": device})
    res = run_ranks(cfg, data, str(tmp_path))
    assert res[0][0] == "ok", res
    ref = reference_weights(cfg, data)
    got = final_model(str(tmp_path))
    tol = 1e-5 if device == "cpu" else 1e-4
    for name in ref:
        assert (got[name] - ref[name]).abs().max().item() <= tol, name
