"""Settings of the ``model_parallel`` strategy (``strategy.kind: model_parallel``).

Stdlib, typing and :mod:`sparkml_dist.errors` only: :mod:`sparkml_dist.config` imports this
module into its ``strategy:`` union. Checks that need the whole job (the mesh against
``training.num_workers``, micro-batches against ``training.batch_size``, the model's layers
against the split) run on the driver in
:meth:`sparkml_dist.strategies.model_parallel.strategy.ModelParallel.check`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from sparkml_dist.errors import ConfigError

TENSOR_STYLES = ("colwise", "rowwise")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True, kw_only=True)
class ModelParallelConfig:
    """``strategy.kind: model_parallel``: ranks split the model (pipeline stages or tensor
    shards), optionally replicated over a data dimension. The mesh is ``data_parallel x
    pipeline_stages x tensor_parallel`` ranks (their product is ``training.num_workers``); one of
    ``pipeline_stages`` and ``tensor_parallel`` is 1. Needs backend.name=torch. Resume is
    bitwise on the same mesh. See :mod:`sparkml_dist.strategies.model_parallel`."""

    kind: Literal["model_parallel"] = "model_parallel"
    """Strategy discriminator."""
    pipeline_stages: int = 2
    """Pipeline stages per model replica (1: no pipeline)."""
    tensor_parallel: int = 1
    """Tensor-parallel shards of the model per replica (1: none)."""
    data_parallel: int = 1
    """Model replicas, each reading its own data shard; gradients are averaged across them."""
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "gpipe"
    """Pipeline schedule: ``gpipe`` (all forwards, then all backwards), ``1f1b`` (one forward,
    one backward in steady state: the same bubble, at most ``pipeline_stages`` micro-batches of
    activations held) or ``interleaved_1f1b`` (each rank holds ``virtual_stages`` chunks of the
    model, which shrinks the bubble by that factor at the cost of more messages)."""
    virtual_stages: int = 1
    """Model chunks per rank under ``interleaved_1f1b`` (>= 2 there, 1 otherwise): the model is
    cut into ``pipeline_stages x virtual_stages`` chunks and rank ``s`` holds chunks ``s, s + p,
    s + 2p, ...``."""
    micro_batches: int = 4
    """Micro-batches each replica's batch (``training.batch_size`` rows) is cut into; it must
    divide ``training.batch_size``."""
    split_at: tuple[str, ...] = ()
    """Names of the top-level layers (children of the model's ``nn.Sequential``) that start
    stages 2..p (chunks 2..p x virtual_stages under ``interleaved_1f1b``), e.g. ``["block2"]``
    for two stages; empty: stages balanced by parameter count."""
    tensor_plan: Mapping[str, str] = field(default_factory=dict)
    """Tensor parallelism: module name (as in ``model.named_modules()``) -> ``colwise`` or
    ``rowwise`` (torch's ColwiseParallel / RowwiseParallel on an ``nn.Linear``); a ``colwise``
    layer is followed by its ``rowwise`` partner. Empty: pairs of ``nn.Linear`` children of an
    ``nn.Sequential`` with only element-wise layers (ReLU, dropout...) between them, the first
    colwise and the second rowwise; other layers stay whole."""

    def __post_init__(self) -> None:
        for name in ("pipeline_stages", "tensor_parallel", "data_parallel", "micro_batches"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                   f"strategy.{name} must be an integer >= 1; got {v!r}.")
        _check(self.pipeline_stages == 1 or self.tensor_parallel == 1,
               f"strategy.pipeline_stages={self.pipeline_stages} with strategy.tensor_parallel="
               f"{self.tensor_parallel}: pipeline and tensor parallelism together are not "
               "supported yet; set one of them to 1 (data_parallel combines with either).")
        _check(self.schedule in ("gpipe", "1f1b", "interleaved_1f1b"),
               f"strategy.schedule must be gpipe, 1f1b or interleaved_1f1b; got "
               f"{self.schedule!r}.")
        _check(isinstance(self.virtual_stages, int) and self.virtual_stages >= 1,
               f"strategy.virtual_stages must be an integer >= 1; got {self.virtual_stages!r}.")
        _check((self.schedule == "interleaved_1f1b") == (self.virtual_stages > 1),
               f"strategy.virtual_stages={self.virtual_stages} with strategy.schedule="
               f"{self.schedule}: interleaved_1f1b needs virtual_stages >= 2, the other "
               "schedules 1.")
        _check(all(isinstance(n, str) and n for n in self.split_at),
               f"strategy.split_at must be a list of layer names; got {list(self.split_at)!r}.")
        _check(not self.split_at or len(self.split_at) == self.chunks - 1,
               f"strategy.split_at names {len(self.split_at)} boundary layer(s) "
               f"({list(self.split_at)}); {self.chunks} pipeline stages (pipeline_stages x "
               f"virtual_stages) need {self.chunks - 1}. Name one layer per stage after the "
               "first, or leave it empty to balance by parameter count.")
        bad = {k: v for k, v in dict(self.tensor_plan).items() if v not in TENSOR_STYLES}
        _check(not bad, f"strategy.tensor_plan values must be one of {', '.join(TENSOR_STYLES)}; "
                        f"got {bad} (other styles, e.g. sequence parallelism, are not offered "
                        "yet).")
        _check(not self.tensor_plan or self.tensor_parallel > 1,
               "strategy.tensor_plan is set but strategy.tensor_parallel=1; set "
               "strategy.tensor_parallel to the number of shards, or drop the plan.")

    @property
    def chunks(self) -> int:
        """Pieces the model is cut into: ``pipeline_stages x virtual_stages``."""
        return self.pipeline_stages * self.virtual_stages

    @property
    def world_size(self) -> int:
        """Ranks the mesh needs."""
        return self.data_parallel * self.pipeline_stages * self.tensor_parallel
