"""Strategies: the ways ranks cooperate over a :class:`~sparkml_dist.comm.base.Communicator`.

One ``strategy.kind`` in config picks one; its own frozen dataclass holds its settings. Each
strategy declares the backend capabilities it needs (checked on the driver before launch by
:func:`check_before_launch`), the data layout it wants, and its resume guarantee. The per-rank
loop every barrier strategy shares is :func:`sparkml_dist.training.loop.train_rank`.

Kinds and where they live:

- ``data_parallel``: :mod:`sparkml_dist.strategies.data_parallel` (DDP or Horovod, optional
  gradient compression), resume bitwise.
- ``gossip``: :mod:`sparkml_dist.strategies.gossip` (decentralized D-PSGD or push-sum over
  point-to-point sends, ring/torus/exponential/random topologies), resume bitwise.
- ``federated``: :mod:`sparkml_dist.strategies.federated` (rounds as ordinary Spark stages, run by
  the driver rather than by the barrier loop).
- ``parameter_server``: :mod:`sparkml_dist.strategies.parameter_server` (servers started by the
  driver, workers as ordinary Spark tasks; sync, async or stale-synchronous; replicated shards),
  resume from a consistent cut, bitwise for sync.
- ``model_parallel``: :mod:`sparkml_dist.strategies.model_parallel` (pipeline stages with GPipe or
  1F1B, tensor-parallel shards, and replicas of either on a data x pipeline x tensor mesh), resume
  bitwise on the same mesh.

Importing this package is cheap and imports nothing else (``sparkml_dist.config`` imports the
config modules of some strategies); the functions below load the registry on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_before_launch", "data_layout", "job_fingerprint", "strategy_class"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sparkml_dist.strategies import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
