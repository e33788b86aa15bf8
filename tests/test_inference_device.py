"""Where the UDF scores: on the task's GPU when Spark assigned one, else on the CPU, with the
same outputs."""

import numpy as np
import pytest
import torch

from sparkml_dist.inference import forward, model_on, task_device
from sparkml_dist.models import mlp


def test_without_a_gpu_assigned_by_spark_scoring_stays_on_the_cpu():
    # Outside a Spark task no GPU is assigned, whether or not the machine has one.
    assert task_device() == torch.device("cpu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"))])
def test_forward_gives_the_same_outputs_on_each_device(device):
    torch.manual_seed(0)
    model = mlp(8, 3, hidden=[16]).eval()
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    ref = torch.softmax(model(torch.from_numpy(x)), dim=1).detach().numpy()
    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    moved, where = model_on(model, dev, x)
    assert where == dev
    got = forward(moved, x, 7, 3, True, where)
    assert got.shape == (50, 3) and np.allclose(got, ref, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot reach CUDA")
def test_a_model_that_cannot_run_on_the_gpu_is_scored_on_the_cpu(caplog):
    # This torch has no CUDA, so moving the model or its first forward there fails: the UDF must
    # then send the inputs to the CPU too, not to the device it asked for.
    torch.manual_seed(0)
    model = mlp(8, 3, hidden=[16]).eval()
    x = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32)
    ref = torch.softmax(model(torch.from_numpy(x)), dim=1).detach().numpy()
    with caplog.at_level("WARNING", logger="sparkml_dist.inference"):
        moved, where = model_on(model, torch.device("cuda", 0), x)
    assert where == torch.device("cpu") and "scoring on the CPU" in caplog.text
    assert np.allclose(forward(moved, x, 7, 3, True, where), ref, atol=1e-6)
