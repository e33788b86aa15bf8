"""The optimizer factory: torch's fused kernels where the parameters allow them, the same
training as the loop implementation up to rounding, and the loop on request."""

import copy

import pytest
import torch

from sparkml_dist.config import OptimizerConfig
from sparkml_dist.models import mlp
from sparkml_dist.training.optim import fusable, make_optimizer


def _train(cfg: OptimizerConfig, steps: int = 100) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = mlp(16, 4, hidden=[32])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    opt = make_optimizer(cfg, model.parameters())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_by_default_and_the_loop_on_request(name):
    params = list(mlp(4, 2, hidden=[8]).parameters())
    fused = make_optimizer(OptimizerConfig(name=name, momentum=0.9 if name == "sgd" else 0.0),
                           params)
    loop = make_optimizer(OptimizerConfig(name=name, fused=False), params)
    assert fused.param_groups[0]["fused"] is True
    assert not loop.param_groups[0]["fused"]


@pytest.mark.parametrize("name,momentum,weight_decay", [("sgd", 0.9, 1e-4), ("adam", 0.0, 0.0),
                                                        ("adamw", 0.0, 1e-2)])
def test_fused_trains_like_the_loop_up_to_rounding(name, momentum, weight_decay):
    kw = {"name": name, "lr": 1e-2, "momentum": momentum, "weight_decay": weight_decay}
    fused = _train(OptimizerConfig(**kw))
    loop = _train(OptimizerConfig(**kw, fused=False))
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and the parameters moved: the comparison is not between two untrained models
    torch.manual_seed(0)
    start = [p.detach() for p in mlp(16, 4, hidden=[32]).parameters()]
    assert max((a - s).abs().max().item() for a, s in zip(fused, start)) > 1e-2


def test_parameters_the_fused_kernels_cannot_take_use_the_loop():
    ints = [torch.zeros(3, dtype=torch.int64)]
    assert not fusable(ints) and not fusable([])
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not fusable(meta)

    class Sub(torch.Tensor):  # a tensor subclass, as tensor parallelism's DTensor is
        pass

    sub = [torch.nn.Parameter(torch.Tensor._make_subclass(Sub, torch.zeros(3)))]
    assert type(sub[0]) is Sub and not fusable(sub)
    assert fusable([torch.nn.Parameter(torch.zeros(3))])
    opt = make_optimizer(OptimizerConfig(name="adam"), meta)
    assert not opt.param_groups[0]["fused"]


def test_a_checkpointed_state_loads_into_a_fused_optimizer_and_continues_the_same():
    """Resume: the state of a fused optimizer reloaded into a new one gives the same steps."""
    torch.manual_seed(0)
    model = mlp(8, 2, hidden=[8])
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    cfg = OptimizerConfig(name="adam")
    opt = make_optimizer(cfg, model.parameters())

    def step(m, o):
        o.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    twin = copy.deepcopy(model)
    twin_opt = make_optimizer(cfg, twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        step(model, opt)
        step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
