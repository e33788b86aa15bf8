"""A parameter-server process: one shard (primary or replica) behind a TCP socket.

Started by the driver as ``python -m sparkml_dist.strategies.parameter_server.server SPEC``:
``SPEC`` is a local file (``torch.load(weights_only=True)``: plain dicts and tensors) with the
:class:`~.shard.ShardSpec`, the shard's initial values and, on resume, the state of the cut it
continues from, which the server deletes once read; the job secret (hex) arrives on
stdin, never in arguments or the environment. The process binds ``host:0`` and prints
``READY <port>`` on stdout; then it serves until told ``shutdown``, killed, or its driver is
gone (it watches its parent process).

Requests (JSON header, raw float32 body, see :mod:`.wire`):

- ``hello {worker}`` -> ``{clock, version}``: where that worker resumes.
- ``pull {worker, step}`` -> body: the shard's values once the mode allows (bounded wait).
- ``push {worker, step, pulled_version, pull_next}`` + body: the gradient. A primary applies
  it, forwards the same request to its replica and waits for the replica's ack before acking the
  worker (chain replication), all under the shard lock so the replica applies pushes in the
  primary's order and holds identical state. A duplicate (same worker and step) is acked and
  ignored. With ``pull_next`` the reply is also the pull for ``step + 1`` (same rule, same wait).
  A primary that lost its replica goes on alone and says so in every reply
  (``replica_lost: {step, why}``), so its clients refuse to fail over to the stale replica.
- ``state`` -> body: the values; header: version and clocks. ``report`` -> measurements and
  the event log. ``shutdown``.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sparkml_dist.strategies.parameter_server import wire
from sparkml_dist.strategies.parameter_server.shard import PullTimeout, Shard, ShardSpec

log = logging.getLogger(__name__)

IDLE_FACTOR = 4.0
"""An accepted connection idle for ``IDLE_FACTOR * backend.timeout_s`` is closed."""


class _Forwarder:
    """The primary's connection to its replica."""

    def __init__(self, address: tuple[str, int], secret: bytes, timeout_s: float) -> None:
        self.address, self.secret, self.timeout_s = address, secret, timeout_s
        self.sock: socket.socket | None = None
        self.lost: str | None = None
        self.lost_at: int | None = None
        """The step of the first push the replica did not get (it holds the state before)."""

    def forward(self, header: dict[str, Any], body: bytes) -> None:
        if self.lost is not None:
            return
        try:
            if self.sock is None:
                self.sock = socket.create_connection(self.address, timeout=self.timeout_s)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wire.send(self.sock, self.secret, header, body)
            reply, _, _ = wire.recv(self.sock, self.secret)
        except (OSError, wire.WireError) as exc:
            self.lost = f"{type(exc).__name__}: {exc}"
            self.lost_at = int(header["step"])
            log.error("replica at %s:%d lost (%s); this primary goes on alone", *self.address,
                      self.lost)
            return
        if "error" in reply:
            raise RuntimeError(f"replica refused a forwarded push: {reply['error']}")


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        srv = self.server
        # A connection idle for this long is dropped, so it does not hold a thread forever;
        # a worker's requests come much more often (its client reconnects when dropped).
        sock.settimeout(IDLE_FACTOR * srv.shard.spec.timeout_s)
        max_body = wire.max_body_for(srv.shard.numel)
        while not srv.stopping.is_set():
            try:
                header, body, n = wire.recv(sock, srv.secret, max_body)
            except (OSError, wire.WireError) as exc:
                if not isinstance(exc, wire.WireError) or "closed" not in str(exc):
                    log.warning("dropping a connection: %s", exc)
                return
            try:
                reply, out = srv.dispatch(header, body, n)
            except PullTimeout as exc:
                reply, out = {"error": str(exc), "kind": "timeout"}, b""
            except Exception as exc:  # noqa: BLE001 - answered to the client, who raises it
                log.exception("request %s failed", header.get("op"))
                reply, out = {"error": f"{type(exc).__name__}: {exc}"}, b""
            fwd = srv.forwarder
            if fwd is not None and fwd.lost is not None:
                # Clients remember it: failing over to this stale replica later is an error.
                reply["replica_lost"] = {"step": fwd.lost_at, "why": fwd.lost}
            try:
                sent = wire.send(sock, srv.secret, reply, out)
            except OSError:
                return
            with srv.shard.cond:
                srv.shard.stats["bytes_out"] += sent
            if header.get("op") == "shutdown":
                threading.Thread(target=srv.shutdown, daemon=True).start()
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, shard: Shard, secret: bytes) -> None:
        super().__init__((host, 0), _Handler)
        self.shard, self.secret = shard, secret
        self.stopping = threading.Event()
        spec = shard.spec
        self.forwarder = _Forwarder(spec.replica, secret, spec.timeout_s) \
            if spec.replica else None

    def dispatch(self, h: dict[str, Any], body: bytes, nbytes: int) -> tuple[dict, bytes]:
        op, shard = h.get("op"), self.shard
        with shard.cond:
            shard.stats["bytes_in"] += nbytes
            if op == "pull":
                values, version = shard.wait_pull(int(h["worker"]), int(h["step"]))
                return {"version": version}, wire.to_bytes(values)
            if op == "push":
                grad = wire.from_bytes(body, shard.numel, f"push to shard {shard.spec.shard}")
                fresh = shard.push(int(h["worker"]), int(h["step"]), int(h["pulled_version"]),
                                   grad)
                if fresh and self.forwarder is not None:
                    self.forwarder.forward({**h, "forwarded": True, "pull_next": False}, body)
                if h.get("pull_next"):  # push-pull: answer with the values for the next step
                    values, version = shard.wait_pull(int(h["worker"]), int(h["step"]) + 1)
                    return {"ok": True, "duplicate": not fresh, "version": version}, \
                        wire.to_bytes(values)
                return {"ok": True, "duplicate": not fresh}, b""
            if op == "hello":
                worker = int(h["worker"])
                shard._check_worker(worker)
                return {"clock": shard.clocks[worker], "version": shard.version,
                        "role": shard.spec.role}, b""
            if op == "state":
                return {"version": shard.version, "clocks": list(shard.clocks)}, \
                    wire.to_bytes(shard.vector())
            if op == "report":
                rep = shard.report()
                rep["replica_lost"] = self.forwarder.lost if self.forwarder else None
                return {"report": rep, "events": shard.events}, b""
            if op == "shutdown":
                self.stopping.set()
                return {"ok": True}, b""
        raise ValueError(f"unknown request {op!r}")


def serve(spec: ShardSpec, values: list[Any], secret: bytes, host: str,
          ready: Any = None, restore: dict[str, Any] | None = None) -> None:
    """Serve one shard until ``shutdown`` (``ready(port)`` is called once bound), from its
    initial ``values`` or from a cut's state (``restore``)."""
    srv = _Server(host, Shard(spec, values, restore), secret)
    port = srv.server_address[1]
    log.info("shard %d %s serving on %s:%d", spec.shard, spec.role, host, port)
    if ready is not None:
        ready(port)
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        srv.server_close()


def _exit_with_parent(interval_s: float = 1.0) -> None:
    """Exit when the driver that started this server is gone (killed without stopping its
    servers), so no server outlives its job."""
    import os

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                log.error("the driver (pid %d) is gone; this server exits", parent)
                os._exit(3)

    threading.Thread(target=watch, name="sparkml_dist-ps-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    import torch

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    raw = torch.load(argv[1], weights_only=True)
    # The spec holds the shard's weights and optimizer state: gone from disk once read, so a
    # driver killed without cleaning up leaves none of it behind.
    Path(argv[1]).unlink(missing_ok=True)
    secret = bytes.fromhex(sys.stdin.readline().strip())
    spec = ShardSpec.from_dict(raw["spec"])

    def ready(port: int) -> None:
        sys.stdout.write(f"READY {port}\n")
        sys.stdout.flush()

    _exit_with_parent()
    t0 = time.monotonic()
    serve(spec, list(raw["values"]), secret, raw["host"], ready, raw.get("restore"))
    log.info("shard %d %s stopped after %.1f s", spec.shard, spec.role, time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
