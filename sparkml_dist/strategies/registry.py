"""``strategy.kind`` -> strategy class, and the driver's pre-launch checks."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sparkml_dist.comm.base import BACKEND_CAPABILITIES
from sparkml_dist.config import JobConfig
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.errors import ConfigError

if TYPE_CHECKING:
    from sparkml_dist.strategies.base import Strategy

# Barrier-loop strategies: kind -> "module:Class" (imported lazily: they import torch).
_BARRIER = {"data_parallel": "sparkml_dist.strategies.data_parallel.strategy:DataParallel",
            "gossip": "sparkml_dist.strategies.gossip:Gossip",
            "model_parallel": "sparkml_dist.strategies.model_parallel.strategy:ModelParallel"}


def strategy_class(kind: str) -> type[Strategy]:
    """The class that runs ``strategy.kind`` inside the barrier loop."""
    try:
        module, name = _BARRIER[kind].split(":")
    except KeyError:
        raise ConfigError(f"strategy.kind={kind!r} does not run in the barrier loop; kinds that "
                          f"do: {', '.join(_BARRIER)}.") from None
    return getattr(importlib.import_module(module), name)


def check_before_launch(cfg: JobConfig) -> None:
    """Fail on the driver, before anything launches, when the strategy needs a capability the
    backend lacks or its settings do not fit the job; the message names what to change."""
    kind = cfg.strategy.kind
    if kind not in _BARRIER:
        return  # strategies with their own orchestration check themselves
    cls = strategy_class(kind)
    have = BACKEND_CAPABILITIES[cfg.backend.name]
    for capability, setting in cls.requirements(cfg).items():
        if capability not in have:
            others = [b for b, caps in BACKEND_CAPABILITIES.items() if capability in caps]
            raise ConfigError(
                f"{setting} needs {capability.value}, which backend.name={cfg.backend.name} does "
                f"not provide. Change {setting.split('=')[0]}, or set backend.name to one of: "
                f"{', '.join(others) or 'none available'}.")
    cls.check(cfg)


def data_layout(cfg: JobConfig) -> DataLayout:
    """Which shards each rank reads, as the strategy wants it."""
    kind: Any = cfg.strategy.kind
    return strategy_class(kind).data_layout(cfg, cfg.training.num_workers)


def job_fingerprint(cfg: JobConfig, layout: DataLayout) -> dict[str, Any]:
    """What a checkpoint of this job records and a resumed job must match: the strategy's own
    settings (:meth:`Strategy.fingerprint_of`), the world size, the data layout, the per-rank
    batch size (it fixes the data order and the schedule's step count) and the model."""
    from sparkml_dist.config import to_dict

    fp = dict(strategy_class(cfg.strategy.kind).fingerprint_of(cfg))
    fp["world_size"] = layout.world_size
    fp["layout"] = [list(s) for s in layout.shards_of_rank]
    fp["training.batch_size"] = cfg.training.batch_size
    fp["model.factory"] = cfg.model.factory
    fp["model.kwargs"] = to_dict(cfg.model.kwargs)
    return fp
