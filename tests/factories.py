"""Model factories used by tests (importable on executors as ``tests.factories``)."""

from torch import nn


def wrong_width(in_features: int, num_outputs: int) -> nn.Module:
    """Ignores ``in_features``: fails with a shape error on real data."""
    return nn.Linear(10, num_outputs)


class _Slow(nn.Module):
    """Wraps a model and sleeps in every training forward, so tests can act mid-run."""

    def __init__(self, inner: nn.Module, delay_s: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay_s = delay_s

    def forward(self, x):
        import time

        if self.training:
            time.sleep(self.delay_s)
        return self.inner(x)


def slow_mlp(in_features: int, num_outputs: int, delay_s: float = 0.02,
             hidden: tuple[int, ...] = (32,), dropout: float = 0.0) -> nn.Module:
    """``sparkml_dist.models.mlp`` that takes at least ``delay_s`` per training step."""
    from sparkml_dist.models import mlp

    return _Slow(mlp(in_features, num_outputs, hidden=hidden, dropout=dropout), delay_s)


class _SlowOnRank(nn.Module):
    """Wraps a model; its training forward sleeps on one rank only (a straggler)."""

    def __init__(self, inner: nn.Module, slow: bool, delay_s: float) -> None:
        super().__init__()
        self.inner = inner
        self.slow = slow
        self.delay_s = delay_s

    def forward(self, x):
        import time

        if self.training and self.slow:
            time.sleep(self.delay_s)
        return self.inner(x)


def straggler_mlp(in_features: int, num_outputs: int, straggler: int = 1,
                  delay_s: float = 0.02, hidden: tuple[int, ...] = (32,)) -> nn.Module:
    """``sparkml_dist.models.mlp`` whose training forward sleeps ``delay_s`` on the rank
    ``straggler`` of the torch.distributed group it is built in (built after the group joins)."""
    import torch.distributed as dist

    from sparkml_dist.models import mlp

    slow = dist.is_initialized() and dist.get_rank() == straggler
    return _SlowOnRank(mlp(in_features, num_outputs, hidden=list(hidden)), slow, delay_s)
