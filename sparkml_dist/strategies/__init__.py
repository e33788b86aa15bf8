"""Strategies: the ways ranks cooperate over a :class:`~sparkml_dist.comm.base.Communicator`.

One ``strategy.kind`` in config picks one; its own frozen dataclass holds its settings. Each
strategy declares the backend capabilities it needs (checked on the driver before launch by
:func:`check_before_launch`), the data layout it wants, and its resume guarantee. The per-rank
loop every strategy shares is :func:`sparkml_dist.training.loop.train_rank`.

Kinds and where they live:

- ``data_parallel``: :mod:`sparkml_dist.strategies.data_parallel` (DDP or Horovod, optional
  gradient compression), resume bitwise.
- ``federated``: :mod:`sparkml_dist.strategies.federated` (rounds as ordinary Spark stages, run by
  the driver rather than by the barrier loop).

This module imports no torch, so the driver can check a config cheaply.
"""

from __future__ import annotations

from sparkml_dist.strategies.registry import (
    check_before_launch, data_layout, job_fingerprint, strategy_class)

__all__ = ["check_before_launch", "data_layout", "job_fingerprint", "strategy_class"]
