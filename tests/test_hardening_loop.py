"""A NaN or infinite loss stops training on every rank at once with a clear error, and the last
good checkpoint stays the newest one (real rank loop, 2 gloo ranks, directory checkpoints)."""

import numpy as np
import pytest
import torch

from sparkml_dist.config import JobConfig
from sparkml_dist.training.local_store import DirectoryCheckpointStore
from tests.ranks import Dataset, digits, final_model, run_ranks


def job(epochs: int, **extra) -> JobConfig:
    return JobConfig().replace(**{
        "model.kwargs": {"hidden": [16]}, "optimizer.name": "sgd", "optimizer.lr": 0.05,
        "training.num_workers": 2, "training.batch_size": 16, "training.epochs": epochs,
        "training.seed": 1, "backend.timeout_s": 60.0, "checkpoint.keep_last": 5, **extra})


@pytest.mark.parametrize("windows", [
    {"training.log_every_steps": 5, "checkpoint.every_steps": 0},     # caught at a metric window
    {"training.log_every_steps": 100, "checkpoint.every_steps": 3},   # caught before a checkpoint
])
def test_non_finite_loss_stops_every_rank_and_keeps_the_last_good_checkpoint(tmp_path, windows):
    clean = digits(400)  # 320 training rows: 10 steps per epoch on each of 2 ranks
    ckpt = str(tmp_path)
    first = run_ranks(job(1, **windows), clean, ckpt)
    assert {s for s, _ in first.values()} == {"ok"}, first
    store = DirectoryCheckpointStore(ckpt)
    good = store.complete_names()
    good_steps = store.read_meta(good[0]).steps_done
    good_model = final_model(ckpt)
    # Epoch 2 resumes on rows whose features overflow the forward pass: the loss is not finite.
    poisoned = Dataset(np.full_like(clean.x, 3e38), clean.y, clean.val_every)
    second = run_ranks(job(2, **windows), poisoned, ckpt, attempt=1)
    assert {s for s, _ in second.values()} == {"error"}, second
    for status, text in second.values():
        assert "the training loss became" in text and "UserCodeError" in text, text
        assert "[sparkml_dist:user-error]" in text  # not relaunched by the driver
    assert store.complete_names() == good  # nothing written after the loss went bad
    assert store.read_meta(good[0]).steps_done == good_steps == 10
    after = final_model(ckpt)
    for k in good_model:
        assert torch.isfinite(after[k]).all() and torch.equal(after[k], good_model[k])


def no_parameters(in_features: int, num_outputs: int) -> torch.nn.Module:
    """A model the optimizer and DDP cannot take: nothing to train."""
    return torch.nn.Identity()


def test_an_error_while_a_rank_sets_up_is_a_user_error(tmp_path):
    cfg = job(1, **{"model.factory": "tests.test_hardening_loop:no_parameters",
                    "model.kwargs": {}})
    results = run_ranks(cfg, digits(200), str(tmp_path))
    assert {s for s, _ in results.values()} == {"error"}, results
    for _, text in results.values():
        assert "[sparkml_dist:user-error] rank" in text and "could not set up training" in text


def test_transport_errors_during_setup_stay_retryable():
    from sparkml_dist.training.loop import setup_error

    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
                        "by peer [127.0.0.1]:4242")
    assert setup_error(lost, 1) is lost
    assert setup_error(TimeoutError("broadcast"), 1).__class__ is TimeoutError
    assert "[sparkml_dist:user-error]" in str(setup_error(TypeError("bad kwarg"), 1))
