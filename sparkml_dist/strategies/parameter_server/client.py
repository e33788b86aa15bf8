"""The workers' (and the driver's) side of the servers: one connection per shard, failover from
a lost primary to its replica, and a clear error naming the shard when none is left."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparkml_dist.strategies.parameter_server import wire

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """One server process of a shard."""

    shard: int
    role: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"shard {self.shard} {self.role} at {self.host}:{self.port}"


class ServerLost(RuntimeError):
    """Every server of a shard is unreachable."""


class ServerError(RuntimeError):
    """A server answered with an error (a bounded wait ran out, a protocol mismatch)."""


@dataclass
class ShardClient:
    """Requests to one shard: its primary, then (once that is lost) its replica."""

    endpoints: tuple[Endpoint, ...]
    secret: bytes = field(repr=False)
    timeout_s: float
    index: int = 0
    sock: socket.socket | None = None
    failovers: list[dict[str, Any]] = field(default_factory=list)
    bytes_out: int = 0
    bytes_in: int = 0
    replica_lost: dict[str, Any] | None = None
    """What the primary said about its replica once it dropped it (step, cause)."""

    @property
    def current(self) -> Endpoint:
        return self.endpoints[self.index]

    def _connect(self) -> socket.socket:
        ep = self.current
        sock = socket.create_connection((ep.host, ep.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A pull may wait up to timeout_s on the server; the reply gets a little more.
        sock.settimeout(self.timeout_s + 30.0)
        return sock

    def request(self, header: dict[str, Any], body: bytes = b"", context: Any = None
                ) -> tuple[dict[str, Any], bytes]:
        """Send one request and return the reply, failing over to the next server of the shard
        when the current one is gone (refused, reset, closed)."""
        errors = []
        while True:
            ep = self.current
            try:
                if self.sock is None:
                    self.sock = self._connect()
                self.bytes_out += wire.send(self.sock, self.secret, header, body)
                reply, out, n = wire.recv(self.sock, self.secret)
                self.bytes_in += n
                break
            except socket.timeout:
                raise ServerError(f"parameter server {ep} did not answer {header.get('op')} "
                                  f"within {self.timeout_s + 30:.0f} s (backend.timeout_s + 30)"
                                  ) from None
            except (OSError, wire.WireError) as exc:
                errors.append(f"{ep}: {type(exc).__name__}: {exc}")
                self.close()
                if self.index + 1 >= len(self.endpoints):
                    raise ServerLost(
                        f"parameter server shard {ep.shard} is lost: "
                        + "; ".join(errors)
                        + (". Set strategy.replicas=1 for a replica to take over."
                           if len(self.endpoints) == 1 else "")) from None
                self.index += 1
                log.warning("%s lost (%s); failing over to %s", ep, exc, self.current)
                self.failovers.append({"shard": ep.shard, "from": str(ep),
                                       "to": str(self.current), "context": context,
                                       "t": time.time()})
                self._check_caught_up(ep, "; ".join(errors))
        if "replica_lost" in reply and self.replica_lost is None:
            self.replica_lost = dict(reply["replica_lost"])
        if "error" in reply:
            raise ServerError(f"parameter server {ep}: {reply['error']}")
        return reply, out

    def _check_caught_up(self, lost: Endpoint, why: str) -> None:
        """After failing over from ``lost``: refuse a replica that primary had dropped (it
        said so in its replies), since the replica misses the pushes applied after that and
        would answer with a step mismatch or hold pulls until the timeout. A client that got
        no reply after the drop acknowledged nothing the replica lacks."""
        dropped = self.replica_lost
        if dropped is None:
            return
        raise ServerLost(
            f"parameter server shard {lost.shard} is lost: {why}. Its replica ({self.current}) "
            f"cannot take over: {lost} had dropped it at step {dropped.get('step')} "
            f"({dropped.get('why')}) and went on alone, so the replica misses the updates since."
            " Resume the run from its last checkpoint (fit(..., resume_run_id=...)).") from None

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class Servers:
    """All shards of a job, as one client."""

    def __init__(self, endpoints: list[list[Endpoint]], secret: bytes, timeout_s: float,
                 sizes: list[int]) -> None:
        self.shards = [ShardClient(tuple(eps), secret, timeout_s) for eps in endpoints]
        self.sizes = sizes

    def hello(self, worker: int) -> int:
        """The step this worker resumes at: the lowest clock over the shards (a worker lost
        between its pushes to two shards re-sends the missing one; the other ignores it)."""
        return min(int(c.request({"op": "hello", "worker": worker})[0]["clock"])
                   for c in self.shards)

    def pull(self, worker: int, step: int) -> tuple[list[np.ndarray], list[int]]:
        out, versions = [], []
        for c, n in zip(self.shards, self.sizes):
            h, body = c.request({"op": "pull", "worker": worker, "step": step}, context=step)
            out.append(wire.from_bytes(body, n, f"pull from {c.current}"))
            versions.append(int(h["version"]))
        return out, versions

    def push(self, worker: int, step: int, versions: list[int], grads: list[np.ndarray],
             pull_next: bool = False) -> tuple[list[np.ndarray], list[int]] | None:
        """Push ``step``'s gradient to every shard; with ``pull_next`` each reply also carries
        the shard's values for ``step + 1`` once the mode allows (one round trip per step and
        shard instead of two)."""
        out, next_versions = [], []
        for c, v, g, n in zip(self.shards, versions, grads, self.sizes):
            h, body = c.request({"op": "push", "worker": worker, "step": step,
                                 "pulled_version": v, "pull_next": pull_next},
                                wire.to_bytes(g), context=step)
            if pull_next:
                out.append(wire.from_bytes(body, n, f"push-pull from {c.current}"))
                next_versions.append(int(h["version"]))
        return (out, next_versions) if pull_next else None

    def state(self) -> list[np.ndarray]:
        return [wire.from_bytes(c.request({"op": "state"})[1], n, f"state of {c.current}")
                for c, n in zip(self.shards, self.sizes)]

    def reports(self) -> list[dict[str, Any]]:
        return [c.request({"op": "report"})[0] for c in self.shards]

    @property
    def failovers(self) -> list[dict[str, Any]]:
        return [f for c in self.shards for f in c.failovers]

    @property
    def bytes(self) -> tuple[int, int]:
        return sum(c.bytes_out for c in self.shards), sum(c.bytes_in for c in self.shards)

    def close(self) -> None:
        for c in self.shards:
            c.close()
