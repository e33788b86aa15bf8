"""Tensor parallelism: the plan, the sharded module, and its state as plain local tensors.

A plan maps module names (``model.named_modules()``) to ``colwise`` or ``rowwise``:
torch's ``ColwiseParallel`` shards an ``nn.Linear``'s output features (each rank computes a slice
of the activations from the whole input), ``RowwiseParallel`` its input features (each rank
multiplies its slice and the partial products are summed by an all_reduce, so the output is
whole again). A ``colwise`` layer followed by its ``rowwise`` partner costs one all_reduce
forward and one backward (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism", section 3). The default plan (:func:`default_plan`)
pairs ``nn.Linear`` children of an ``nn.Sequential`` with only element-wise layers (ReLU,
dropout...) between them, which act on the sharded activations unchanged.

Only these two styles are offered (sequence parallelism and the others are not, yet).
A checkpoint holds each rank's local shards (:func:`local_state`), restored into the same mesh
by :func:`load_local_state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparkml_dist.errors import ConfigError


ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Dropout,
               nn.Identity)
"""Layers that may sit between the two linear layers of a pair: they act on each activation
alone, so they work on the sharded activations unchanged."""


def default_plan(model: nn.Module) -> dict[str, str]:
    """Pairs of ``nn.Linear`` children of one ``nn.Sequential`` with only :data:`ELEMENTWISE`
    children between them: the first ``colwise``, the second ``rowwise``; other layers stay
    whole (replicated). Anything else between the two (a normalisation, a residual block) would
    see only a slice of the activations, and a linear layer inside another kind of module may be
    followed by anything in its forward, so neither is paired."""
    plan: dict[str, str] = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        pending: str | None = None
        for name, m in seq.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(m, nn.Linear):
                if pending is None:
                    pending = full
                else:
                    plan[pending], plan[full] = "colwise", "rowwise"
                    pending = None
            elif not isinstance(m, ELEMENTWISE):
                pending = None
    return plan


def check_plan(model: nn.Module, plan: Mapping[str, str], shards: int, factory: str) -> None:
    """Every planned module exists, is an ``nn.Linear`` and splits evenly over ``shards``."""
    modules = dict(model.named_modules())
    if not plan:
        raise ConfigError(f"strategy.tensor_parallel={shards}: the model ({factory}) has no two "
                          "nn.Linear layers with only element-wise layers between them to pair; "
                          "name the layers in strategy.tensor_plan, or set "
                          "strategy.tensor_parallel=1.")
    for name, style in plan.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            linears = [n for n, x in modules.items() if isinstance(x, nn.Linear)]
            raise ConfigError(f"strategy.tensor_plan names {name!r} ({style}), which is "
                              f"{'not a module' if m is None else type(m).__name__} of "
                              f"{factory}; plan nn.Linear layers only: {', '.join(linears)}.")
        width = m.out_features if style == "colwise" else m.in_features
        if width % shards:
            raise ConfigError(f"strategy.tensor_plan: {name!r} ({style}) has {width} "
                              f"{'output' if style == 'colwise' else 'input'} features, not "
                              f"divisible by strategy.tensor_parallel={shards}; change the "
                              "layer's width or the shard count.")


def parallelize(model: nn.Module, mesh: Any, plan: Mapping[str, str]) -> nn.Module:
    """Shard ``model`` in place over the 1-D ``mesh`` by ``plan``."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, parallelize_module)

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    return parallelize_module(model, mesh, {k: styles[v]() for k, v in plan.items()})


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def to_local(obj: Any) -> Any:
    """``obj`` with every DTensor replaced by a copy of this rank's shard (nested dicts, lists)."""
    if _is_dtensor(obj):
        return obj.to_local().detach().clone()
    if isinstance(obj, dict):
        return {k: to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_local(v) for v in obj)
    return obj


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, sharded tensors gathered (collective over the mesh)."""
    return {k: (v.full_tensor() if _is_dtensor(v) else v).detach().clone()
            for k, v in model.state_dict().items()}


def local_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model and of the optimizer's state, as plain tensors."""
    return {"model": to_local(model.state_dict()), "optimizer": to_local(optimizer.state_dict())}


@torch.no_grad()
def load_local_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                     saved: Mapping[str, Any]) -> None:
    """Restore :func:`local_state` into a model sharded the same way."""
    from torch.distributed.tensor import DTensor

    for k, v in model.state_dict().items():
        (v.to_local() if _is_dtensor(v) else v).copy_(saved["model"][k])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sd = saved["optimizer"]
    state: dict[Any, Any] = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())
                    if _is_dtensor(p) and torch.is_tensor(v) and v.shape == p.to_local().shape
                    and v.dim() > 0 else v for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
