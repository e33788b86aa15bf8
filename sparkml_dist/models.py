"""Reference models and the model factory resolver.

A factory is any callable ``f(in_features: int, num_outputs: int, **kwargs) -> nn.Module`` named
in config as ``package.module:function``.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn

from sparkml_dist.errors import ConfigError


def linear(in_features: int, num_outputs: int) -> nn.Module:
    """Logistic / softmax regression (or linear regression with one output)."""
    return nn.Linear(in_features, num_outputs)


def mlp(in_features: int, num_outputs: int, hidden: Sequence[int] = (64,),
        dropout: float = 0.0) -> nn.Module:
    """A ReLU multilayer perceptron with the given hidden widths."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """A two-convolution network for ``side x side`` single-channel images fed as flat rows."""

    def __init__(self, in_features: int, num_outputs: int, channels: int = 16) -> None:
        super().__init__()
        side = int(round(in_features ** 0.5))
        if side * side != in_features:
            raise ConfigError(f"model small_cnn needs square images; {in_features} features is "
                              "not a square. Use model.factory=sparkml_dist.models:mlp instead.")
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(channels * 2 * 4, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, self.side, self.side)
        return self.head(torch.flatten(self.features(x), 1))


def small_cnn(in_features: int, num_outputs: int, channels: int = 16) -> nn.Module:
    """A small CNN for 8x8 images (e.g. scikit-learn's digits)."""
    return SmallCNN(in_features, num_outputs, channels)


class ResidualBlock(nn.Module):
    """``x + relu(linear(layer_norm(x)))``: one block of :func:`deep_mlp`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


def deep_mlp(in_features: int, num_outputs: int, width: int = 64, depth: int = 4) -> nn.Module:
    """A residual MLP worth splitting into pipeline stages: an ``nn.Sequential`` of ``input``
    (linear + ReLU), ``block0`` .. ``block{depth-1}`` (:class:`ResidualBlock`) and ``head``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        input=nn.Sequential(nn.Linear(in_features, int(width)), nn.ReLU()))
    for i in range(int(depth)):
        layers[f"block{i}"] = ResidualBlock(int(width))
    layers["head"] = nn.Linear(int(width), num_outputs)
    return nn.Sequential(layers)


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """Import ``package.module:function``; errors say what failed and how to fix it."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.factory {path!r}: cannot import module {module_name!r} ({exc}). "
                          "The module must be importable on the driver and every executor "
                          "(install it there or ship it with --py-files).") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.factory {path!r}: {module_name} has no callable {attr!r}.")
    return factory


def build_model(path: str, in_features: int, num_outputs: int,
                kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the configured model and check it is an ``nn.Module``."""
    model = resolve_factory(path)(in_features=in_features, num_outputs=num_outputs,
                                  **dict(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory {path!r} returned {type(model).__name__}, "
                          "expected a torch.nn.Module.")
    return model
