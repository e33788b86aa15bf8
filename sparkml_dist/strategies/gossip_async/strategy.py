"""The rank side of asynchronous push-sum: the model, the push-sum state, the mailboxes and the
rank's own data position. The loop that drives it is :mod:`.loop`; the design is in the package
docstring."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, ClassVar

import numpy as np
import torch

from sparkml_dist.algo.gossip import apply_update, halve, may_push, push_target
from sparkml_dist.comm.base import Capability, require
from sparkml_dist.errors import CheckpointError, ConfigError
from sparkml_dist.strategies.base import RankContext, StrategyState
from sparkml_dist.strategies.gossip import Gossip
from sparkml_dist.strategies.gossip_async.loop import run_async
from sparkml_dist.strategies.gossip_async.mailbox import Inbox, Outbox, own_address
from sparkml_dist.strategies.parameter_server.wire import to_bytes
from sparkml_dist.training.objective import prepare_target

log = logging.getLogger(__name__)

RESUME_GUARANTEE = (
    "consistent cut: each epoch end is a cut (every rank's push-sum numerator and weight, model, "
    "optimizer, schedule and data position, with no message in flight); the run continues from "
    "it, but what follows depends on the ranks' timing, so not bitwise")
_SECRET_KEY = "gossip_async/secret"


def cycle_order(rows: int, seed: int, rank: int, cycle: int) -> np.ndarray:
    """Rank ``rank``'s order over its own ``rows`` rows in its ``cycle``-th pass."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, rank, cycle, 0x6A5]))
    return rng.permutation(rows)


class AsyncPushSum(Gossip):
    """``strategy.kind: gossip`` with ``strategy.algorithm: async_push_sum``."""

    resume_guarantee: ClassVar[str] = RESUME_GUARANTEE
    own_loop = staticmethod(run_async)  # type: ignore[assignment]  # see Strategy.own_loop

    def __init__(self, ctx: RankContext) -> None:
        super().__init__(ctx)
        self.push_sum = True
        self.epochs_done = 0
        self.local_steps = 0  # this rank's steps over the whole job
        self.pushes = 0
        self.position = (0, 0)  # (pass over the shard, offset in that pass)
        self.sched_at = 0  # job-wide steps the schedule has been advanced to
        self.pushes_skipped = 0  # the sender's queue was full
        self.pushes_held = 0  # the weight was below the push floor
        self.absorbed = 0
        self.age_s = 0.0  # summed over absorbed messages: absorbed at minus sent at
        self.inbox: Inbox | None = None
        self.outbox: Outbox | None = None
        self._order: tuple[int, np.ndarray] | None = None

    # -- checkpoint ------------------------------------------------------------------------

    def state(self) -> StrategyState:
        st = super().state()  # own model, optimizer, schedule, (x, w); shared: the average
        assert st.per_rank is not None and st.shared is not None
        st.per_rank.update(local_steps=self.local_steps, pushes=self.pushes,
                           position=list(self.position), sched_at=self.sched_at,
                           epochs_done=self.epochs_done)
        st.shared["epochs_done"] = self.epochs_done
        return st

    def load_state(self, shared: dict[str, Any], per_rank: dict[str, Any] | None) -> None:
        if per_rank is None or "position" not in per_rank:
            raise CheckpointError(f"the checkpoint has no async push-sum part for rank "
                                  f"{self.ctx.comm.rank}: every rank's own state is needed to "
                                  "resume; start a new run.")
        super().load_state(shared, per_rank)
        self.local_steps, self.pushes = int(per_rank["local_steps"]), int(per_rank["pushes"])
        self.position = (int(per_rank["position"][0]), int(per_rank["position"][1]))
        self.sched_at, self.epochs_done = int(per_rank["sched_at"]), int(per_rank["epochs_done"])

    # -- wiring ----------------------------------------------------------------------------

    def start(self) -> None:
        comm = self.ctx.comm
        require(comm, Capability.P2P, "strategy.algorithm=async_push_sum")
        if any(p.dtype != torch.float32 for p in self.params):
            raise ConfigError("strategy.algorithm=async_push_sum sends float32 parameters; the "
                              "model has parameters of dtype "
                              f"{sorted({str(p.dtype) for p in self.params})}. Build the model "
                              "in float32.")
        if self.numerator is None:
            self.numerator = self._flat().clone()
            self.weight = torch.ones(1, dtype=self.numerator.dtype, device=self.ctx.device)
        store = comm.store  # the rendezvous store (sealed under the attempt's secret on Spark)
        if comm.rank == 0:
            store.set(_SECRET_KEY, secrets.token_hex(32))
        secret = bytes.fromhex(store.get(_SECRET_KEY).decode())
        endpoint = getattr(comm, "_endpoint", None)
        host = own_address(endpoint.host) if endpoint is not None else "127.0.0.1"
        self.inbox = Inbox(comm.rank, self.numerator.numel(), secret, host, comm.timeout_s)
        try:
            addresses = [tuple(a) for a in comm.all_gather_object(list(self.inbox.address))]
            self.outbox = Outbox(comm.rank, secret, addresses, comm.timeout_s)
        except BaseException:  # a lost peer before training: no listener outlives the attempt
            self.close()
            raise
        log.info("async push-sum: rank %d listens at %s:%d, %s graph of %d ranks, a push every "
                 "%d step(s)", comm.rank, *self.inbox.address, self.cfg.topology,
                 self.topology.world_size, self.cfg.gossip_every)

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
        if self.inbox is not None:
            self.inbox.close()

    # -- data ------------------------------------------------------------------------------

    def next_rows(self, rows: int, batch_size: int) -> np.ndarray:
        """The rows of this rank's next batch: its own shard in a fresh seeded order per pass
        (a pass's tail shorter than a batch is skipped; the next pass orders rows anew)."""
        cycle, offset = self.position
        if offset + batch_size > rows:
            cycle, offset = cycle + 1, 0
        if self._order is None or self._order[0] != cycle:
            self._order = (cycle, cycle_order(rows, self.ctx.cfg.training.seed,
                                              self.ctx.comm.rank, cycle))
        self.position = (cycle, offset + batch_size)
        return self._order[1][offset:offset + batch_size]

    # -- the step --------------------------------------------------------------------------

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What arrived, then one local step, then (every ``gossip_every`` steps) one push;
        ``step`` is unused (the rank counts its own)."""
        self.absorb()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.net(x)
        loss = self.loss(out, prepare_target(y, out, self.task))
        loss.backward()
        before = self._flat()
        self.optimizer.step()
        with torch.no_grad():
            self._set_flat(apply_update(self.numerator, self.weight, before, self._flat()))
        self.local_steps += 1
        if self.local_steps % self.cfg.gossip_every == 0:
            self._push()
        return loss.detach()

    def advance_schedule(self, job_steps: int) -> None:
        """Move the learning-rate schedule to ``job_steps`` (the job's samples so far over the
        global batch), so every rank follows the job's progress, not its own step count."""
        target = min(job_steps, self.ctx.total_steps)
        while self.sched_at < target:
            self.scheduler.step()
            self.sched_at += 1

    @torch.no_grad()
    def absorb(self) -> None:
        """Add what the inbox holds to ``(x, w)`` and de-bias into the model."""
        assert self.inbox is not None
        got = self.inbox.take()
        if got is None:
            return
        x, w, n, sent_at = got
        self.numerator += torch.from_numpy(x).to(self.ctx.device)
        self.weight += w
        self.absorbed += n
        self.age_s += n * time.time() - sent_at
        self._set_flat(self.numerator / self.weight)

    def _push(self) -> None:
        assert self.outbox is not None
        if not may_push(float(self.weight)):
            self.pushes_held += 1  # keeps its mass until some comes back
            return
        rank = self.ctx.comm.rank
        dst = push_target(self.topology.out_peers(rank, self.pushes), self.pushes)
        w = float(self.weight) * 0.5
        body = to_bytes((self.numerator * 0.5).cpu().numpy())
        header = {"src": rank, "w": w, "seq": self.pushes, "t": time.time()}
        if self.outbox.offer(dst, header, body):
            halve(self.numerator, self.weight)  # z = x / w is unchanged
            self.pushes += 1
        else:
            self.pushes_skipped += 1

    def counters(self) -> tuple[float, ...]:
        """Running totals of this attempt: bytes sent, pushes, pushes skipped (queue full),
        pushes held (weight below the floor), messages absorbed, and their summed age."""
        assert self.outbox is not None
        return (self.outbox.bytes_sent, self.pushes, self.pushes_skipped, self.pushes_held,
                self.absorbed, self.age_s)

    def end_epoch(self, epochs_done: int) -> None:
        """Record that ``epochs_done`` epochs are done (after the cut); the average model is
        recomputed once per epoch."""
        self.epochs_done = epochs_done
        self._steps = epochs_done  # what the cached average of the ranks' models is keyed by

    def cut(self) -> None:
        """Make this epoch end a consistent cut (collective): send everything, learn from every
        peer how many messages it sent here, wait for them and absorb them."""
        assert self.inbox is not None and self.outbox is not None
        self.outbox.flush()
        sent = self.ctx.comm.all_gather_object(dict(self.outbox.sent))
        rank = self.ctx.comm.rank
        self.inbox.wait_for({src: s.get(rank, 0) for src, s in enumerate(sent) if s.get(rank)})
        self.absorb()
