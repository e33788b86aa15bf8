"""Decentralized gossip training (``strategy.kind: gossip``): no server and no allreduce per step.

Placement: every rank builds the whole model from the same seed and holds its own optimizer and
schedule; the ranks' models drift apart between averagings. Step: forward, backward and an
optimizer step on the rank's own batch, then, every ``strategy.gossip_every`` steps, one gossip
round over point-to-point sends (:meth:`Communicator.exchange`) with the neighbours the topology
gives for that step (:mod:`sparkml_dist.algo.topology`):

- ``dpsgd`` (Lian et al. 2017): send the flat parameters to every neighbour, receive theirs and
  replace the own by the Metropolis-weighted average.
- ``push_sum`` (SGP, Assran et al. 2019): the rank keeps a numerator ``x`` and a weight ``w``;
  the optimizer works on the de-biased ``z = x / w`` (the module's parameters) and its update is
  added to ``x``; ``(x, w)`` go to the out-peers only, and what arrives is summed with the
  column-stochastic weights.

The math is in :mod:`sparkml_dist.algo.gossip`. Only parameters are gossiped; buffers (e.g.
batch-norm statistics) stay each rank's own.

Checkpoint: each rank's own model, optimizer, schedule and push-sum state is its part; the
shared part holds ``model``: the average of all ranks' models (one all_reduce at checkpoint time,
floating-point entries averaged, integer ones rank 0's). That average is what the driver logs as
the final model, and what validation runs through (so ``val/*`` metrics are those of the model a
user gets). Resume guarantee: bitwise (every rank restores exactly its own state; the random
topology is a pure function of ``(training.seed, step)``).

Metrics per window: ``gossip/consensus_distance`` (mean squared distance of the ranks' flat
parameters to their average, from one float64 all_reduce) and ``gossip/consensus_relative``
(that over the average's squared norm), ``comm/bytes_per_step`` (sent by this rank),
``time/comm_s`` (waiting in the exchange). The topology's spectral gap is the run tag
``sparkml_dist.gossip.spectral_gap``.

Both rules above are synchronous: every rank waits for its neighbours each round, and the
shared loop's collectives hold every rank to the slowest. ``async_push_sum`` is the
asynchronous variant with its own loop, in :mod:`sparkml_dist.strategies.gossip_async`.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, ClassVar

import torch
from torch import nn

from sparkml_dist.algo.gossip import Round, combine, consensus_distance, debias, plan_round
from sparkml_dist.algo.topology import Topology, topology_gap
from sparkml_dist.comm.base import Capability, require
from sparkml_dist.config import GossipConfig, JobConfig
from sparkml_dist.errors import CheckpointError, ConfigError
from sparkml_dist.strategies.base import RankContext, Strategy, StrategyState
from sparkml_dist.strategies.data_parallel.strategy import build_replica, user_check
from sparkml_dist.training.objective import loss_fn, prepare_target
from sparkml_dist.training.optim import make_optimizer, make_scheduler

log = logging.getLogger(__name__)

ASYNC = "async_push_sum"
"""``strategy.algorithm`` of asynchronous gossip (:mod:`sparkml_dist.strategies.gossip_async`)."""


class Gossip(Strategy):
    """``strategy.kind: gossip``. With ``strategy.algorithm: async_push_sum`` an instance is an
    :class:`~sparkml_dist.strategies.gossip_async.AsyncPushSum`, which runs its own loop."""

    kind: ClassVar[str] = "gossip"
    resume_guarantee: ClassVar[str] = "bitwise"

    def __new__(cls, ctx: RankContext) -> Gossip:
        if cls is Gossip and ctx.cfg.strategy.algorithm == ASYNC:
            from sparkml_dist.strategies.gossip_async import AsyncPushSum

            cls = AsyncPushSum
        return super().__new__(cls)

    @classmethod
    def requirements(cls, cfg: JobConfig) -> dict[Capability, str]:
        return {Capability.P2P: "strategy.kind=gossip"}

    @classmethod
    def check(cls, cfg: JobConfig) -> None:
        if cfg.strategy.algorithm != ASYNC:
            return
        what = "strategy.algorithm=async_push_sum"
        if cfg.training.early_stopping is not None:
            raise ConfigError(f"{what} does not support training.early_stopping (ranks stop "
                              "at their own pace); remove training.early_stopping or set "
                              "strategy.algorithm to push_sum or dpsgd.")
        if cfg.checkpoint.enabled and cfg.checkpoint.every_steps:
            raise ConfigError(f"{what} checkpoints a consistent cut at every epoch end only; "
                              f"got checkpoint.every_steps={cfg.checkpoint.every_steps}. Set "
                              "checkpoint.every_steps=0.")
        if cfg.training.num_workers < 2:
            raise ConfigError(f"{what} needs training.num_workers >= 2 (got "
                              f"{cfg.training.num_workers}): one rank has nobody to gossip "
                              "with.")

    @classmethod
    def topology_of(cls, cfg: JobConfig, world_size: int | None = None) -> Topology:
        """The job's gossip graph (``world_size`` defaults to ``training.num_workers``)."""
        return Topology(cfg.strategy.topology, world_size or cfg.training.num_workers,
                        cfg.training.seed)

    @classmethod
    def run_tags(cls, cfg: JobConfig) -> dict[str, str]:
        st: GossipConfig = cfg.strategy
        mixing = "push_sum" if st.algorithm == ASYNC else st.algorithm
        gap = topology_gap(cls.topology_of(cfg), mixing)  # async: that of the synchronous rule
        tags = super().run_tags(cfg)
        if st.algorithm == ASYNC:
            from sparkml_dist.strategies.gossip_async import RESUME_GUARANTEE

            tags["sparkml_dist.resume_guarantee"] = RESUME_GUARANTEE
        return {**tags, "sparkml_dist.gossip.topology": st.topology,
                "sparkml_dist.gossip.algorithm": st.algorithm,
                "sparkml_dist.gossip.every": str(st.gossip_every),
                "sparkml_dist.gossip.spectral_gap": f"{gap:.6f}"}

    @classmethod
    def fingerprint_of(cls, cfg: JobConfig) -> dict[str, Any]:
        st: GossipConfig = cfg.strategy
        return {"kind": cls.kind, "topology": st.topology, "algorithm": st.algorithm,
                "gossip_every": st.gossip_every}

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.cfg: GossipConfig = ctx.cfg.strategy
        self.task = ctx.cfg.data.task
        self.topology = self.topology_of(ctx.cfg, ctx.comm.world_size)
        self.net = build_replica(ctx)
        self.params = [p for p in self.net.parameters()]
        self.optimizer = make_optimizer(ctx.cfg.optimizer, self.params)
        self.scheduler = make_scheduler(ctx.cfg.optimizer, self.optimizer, ctx.steps_per_epoch,
                                        ctx.total_steps)
        self.loss = loss_fn(self.task)
        self.push_sum = self.cfg.algorithm == "push_sum"
        self.numerator: torch.Tensor | None = None  # push-sum x (flat); z = x / w is in the net
        self.weight: torch.Tensor | None = None  # push-sum w, shape (1,)
        self._static_round: Round | None = None
        self._avg_net: nn.Module | None = None
        self._avg_at = -1  # steps done when the average was last computed
        self._steps = 0
        self._sent_bytes = 0
        self._comm_s = 0.0

    def probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        user_check(self.net, x, y, self.task)

    # -- flat parameters -------------------------------------------------------------------

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def _set_flat(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    # -- checkpoint ------------------------------------------------------------------------

    def _average_state(self) -> dict[str, torch.Tensor]:
        """The mean of every rank's model (collective: every rank calls it at the same step)."""
        sd = self.net.state_dict()
        floats = [k for k, v in sd.items() if v.is_floating_point()]
        flat = torch.cat([sd[k].detach().reshape(-1).double() for k in floats]) if floats \
            else torch.zeros(0, dtype=torch.float64, device=self.ctx.device)
        self.ctx.comm.all_reduce(flat, "avg")
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for k, v in sd.items():
            if v.is_floating_point():
                out[k] = flat[offset:offset + v.numel()].view_as(v).to(v.dtype).clone()
                offset += v.numel()
            else:
                out[k] = v.clone()
        return out

    def _averaged_net(self) -> nn.Module:
        if self._avg_net is None:
            self._avg_net = copy.deepcopy(self.net)
        if self._avg_at != self._steps:
            self._avg_net.load_state_dict(self._average_state())
            self._avg_at = self._steps
        return self._avg_net

    def state(self) -> StrategyState:
        part: dict[str, Any] = {"model": self.net.state_dict(),
                                "optimizer": self.optimizer.state_dict(),
                                "scheduler": self.scheduler.state_dict(), "steps": self._steps}
        if self.push_sum:
            part["numerator"] = self.numerator
            part["weight"] = self.weight
        shared = {"model": self._averaged_net().state_dict(), "steps": self._steps,
                  "topology": self.cfg.topology, "algorithm": self.cfg.algorithm}
        return StrategyState(shared=shared, per_rank=part)

    def load_state(self, shared: dict[str, Any], per_rank: dict[str, Any] | None) -> None:
        if per_rank is None:
            raise CheckpointError(f"the gossip checkpoint has no part for rank "
                                  f"{self.ctx.comm.rank}: every rank's own model is needed to "
                                  "resume; start a new run.")
        self.net.load_state_dict(per_rank["model"])
        self.optimizer.load_state_dict(per_rank["optimizer"])
        self.scheduler.load_state_dict(per_rank["scheduler"])
        self._steps = int(per_rank["steps"])
        if self.push_sum:
            self.numerator = per_rank["numerator"].to(self.ctx.device)
            self.weight = per_rank["weight"].to(self.ctx.device)

    def start(self) -> None:
        require(self.ctx.comm, Capability.P2P, "strategy.kind=gossip")
        if self.push_sum and self.numerator is None:
            self.numerator = self._flat().clone()
            self.weight = torch.ones(1, dtype=self.numerator.dtype, device=self.ctx.device)
        if self.topology.static:
            self._static_round = plan_round(self.topology, self.cfg.algorithm,
                                            self.ctx.comm.rank, 0)
        log.info("gossip: %s over a %s graph of %d ranks, every %d step(s)", self.cfg.algorithm,
                 self.cfg.topology, self.topology.world_size, self.cfg.gossip_every)

    # -- the step --------------------------------------------------------------------------

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.net(x)
        loss = self.loss(out, prepare_target(y, out, self.task))
        loss.backward()
        before = self._flat() if self.push_sum else None
        self.optimizer.step()
        self.scheduler.step()
        if self.push_sum:
            self.numerator += self._flat() - before  # SGP: the update of z is applied to x
        if (step + 1) % self.cfg.gossip_every == 0:
            self._gossip(step)
        self._steps = step + 1
        return loss.detach()

    def _gossip(self, step: int) -> None:
        rnd = self._static_round or plan_round(self.topology, self.cfg.algorithm,
                                               self.ctx.comm.rank, step)
        own = torch.cat([self.numerator, self.weight]) if self.push_sum else self._flat()
        received = {j: torch.empty_like(own) for j in rnd.recv_from}
        t0 = time.perf_counter()
        self.ctx.comm.exchange({j: own for j in rnd.send_to}, received)
        self._comm_s += time.perf_counter() - t0
        self._sent_bytes += own.numel() * own.element_size() * len(rnd.send_to)
        mixed = combine(own, rnd, received)
        if self.push_sum:
            self.numerator, self.weight = mixed[:-1], mixed[-1:]
            self._set_flat(debias(self.numerator, self.weight))
        else:
            self._set_flat(mixed)

    def eval_module(self) -> nn.Module:
        """The average of every rank's model (collective; the loop calls it on every rank)."""
        return self._averaged_net()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def take_metrics(self, steps: int) -> dict[str, float]:
        """Consensus distance (one all_reduce, every rank calls it at each window), bytes sent
        and exchange time per step."""
        flat = self._flat().double()
        sums = torch.cat([flat, flat.pow(2).sum().reshape(1)])
        self.ctx.comm.all_reduce(sums, "sum")
        dist, rel = consensus_distance(sums[:-1], float(sums[-1]), self.ctx.comm.world_size)
        steps = max(1, steps)
        out = {"gossip/consensus_distance": dist, "gossip/consensus_relative": rel,
               "comm/bytes_per_step": self._sent_bytes / steps, "time/comm_s": self._comm_s / steps}
        if self.push_sum:
            out["gossip/push_sum_weight"] = float(self.weight)
        self._sent_bytes, self._comm_s = 0, 0.0
        return out
