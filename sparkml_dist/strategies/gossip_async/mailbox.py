"""The asynchronous gossip mailboxes: a rank's inbox server and its background sender.

Both speak the parameter servers' wire (:mod:`sparkml_dist.strategies.parameter_server.wire`):
one HMAC-SHA256-authenticated frame per message, a JSON header and a raw float32 body, nothing
unpickled, the body size bounded before it is read. A message is one push-sum half: header
``{"src": rank, "w": weight, "seq": n, "t": send time}``, body the numerator ``x``.

- :class:`Inbox` listens on an ephemeral TCP port; one thread accepts, one thread per peer
  connection reads frames and adds them to a pending ``(x, w)`` sum under a lock. The training
  thread takes that sum with :meth:`Inbox.take`; it never waits for a message during training.
  At a cut it waits (bounded) until every message a peer says it sent has arrived.
- :class:`Outbox` owns one connection per peer and a bounded queue; the training thread hands it
  a message with :meth:`Outbox.offer`, which returns False instead of blocking when the queue is
  full (the caller then keeps its mass). A failed send is kept and raised, naming the peer, by
  the next :meth:`Outbox.offer` or :meth:`Outbox.flush`.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from typing import Any

import numpy as np

from sparkml_dist.strategies.parameter_server import wire
from sparkml_dist.waits import join_within

log = logging.getLogger(__name__)


def own_address(peer_host: str) -> str:
    """The local address that routes to ``peer_host`` (rank 0's host): what peers dial."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(peer_host), 9))  # UDP: nothing is sent
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class Inbox:
    """Receives push-sum halves from peers; see the module docstring."""

    def __init__(self, rank: int, numel: int, secret: bytes, host: str, timeout_s: float) -> None:
        self.rank, self.numel, self.secret, self.timeout_s = rank, numel, secret, timeout_s
        self._lock = threading.Condition()
        self._x = np.zeros(numel, dtype=np.float32)
        self._w = 0.0
        self._pending = 0
        self._sent_at = 0.0  # sum of the pending messages' send times (time.time())
        self.received: dict[int, int] = {}
        """Peer rank -> messages received from it (this attempt)."""
        self.bytes_received = 0
        self._error: str | None = None
        self._closed = False
        self._conns: list[socket.socket] = []
        self.lost: set[int] = set()
        """Peers whose connection closed (a peer that exits closes it; during training that
        means the peer is lost)."""
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.5)
        self.address = (host, self._sock.getsockname()[1])
        self._threads = [threading.Thread(target=self._accept, daemon=True,
                                          name=f"gossip-inbox-{rank}")]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._read, args=(conn,), daemon=True,
                                 name=f"gossip-inbox-{self.rank}-conn")
            t.start()
            self._threads.append(t)

    def _read(self, conn: socket.socket) -> None:
        # A peer's connection is idle while that peer computes; the bound on a wait is at the
        # cut (Inbox.wait_for), not here.
        src = -1
        with conn:
            while not self._closed:
                try:
                    header, body, n = wire.recv(conn, self.secret, wire.max_body_for(self.numel))
                    x = wire.from_bytes(body, self.numel, f"message to rank {self.rank}")
                    src, w = int(header["src"]), float(header["w"])
                    sent_at = float(header.get("t", 0.0))
                except (wire.WireError, OSError, KeyError, ValueError, TypeError) as exc:
                    if self._closed:
                        return
                    if src < 0:  # nothing authenticated came on it: not a peer's connection
                        log.warning("rank %d's inbox dropped a connection that sent no valid "
                                    "message: %s: %s", self.rank, type(exc).__name__, exc)
                        return
                    # A peer that died, between frames or in the middle of one.
                    gone = isinstance(exc, (ConnectionResetError, BrokenPipeError)) or (
                        isinstance(exc, wire.WireError) and "closed by the peer" in str(exc))
                    with self._lock:
                        if gone:
                            self.lost.add(src)
                        else:
                            self._error = f"{type(exc).__name__}: {exc}"
                        self._lock.notify_all()
                    return
                with self._lock:
                    self._x += x
                    self._w += w
                    self._pending += 1
                    self._sent_at += sent_at
                    self.received[src] = self.received.get(src, 0) + 1
                    self.bytes_received += n
                    self._lock.notify_all()

    def take(self) -> tuple[np.ndarray, float, int, float] | None:
        """The sum of the halves received since the last call (``x``, ``w``, messages, the sum
        of their send times), or None when nothing arrived."""
        with self._lock:
            if self._error is not None:
                raise ConnectionError(f"rank {self.rank}'s inbox refused a message: "
                                      f"{self._error}")
            if self._pending == 0:
                return None
            out = (self._x, self._w, self._pending, self._sent_at)
            self._x = np.zeros(self.numel, dtype=np.float32)
            self._w, self._pending, self._sent_at = 0.0, 0, 0.0
            return out

    def wait_for(self, expected: dict[int, int]) -> None:
        """Wait (at most ``timeout_s``) until ``expected[peer]`` messages have arrived from each
        peer; the error names the peers whose messages are missing."""
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            while True:
                missing = {p: n - self.received.get(p, 0) for p, n in expected.items()
                           if self.received.get(p, 0) < n}
                if not missing or self._error is not None:
                    break
                gone = sorted(set(missing) & self.lost)
                if gone:  # everything a closed connection carried has been read already
                    raise ConnectionError(
                        f"rank {self.rank}: rank(s) {gone} closed their connection with "
                        f"{sum(missing[p] for p in gone)} message(s) for this cut unsent; the "
                        "peer is lost (see its task's error).")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"rank {self.rank}: messages from rank(s) {sorted(missing)} did not "
                        f"arrive within backend.timeout_s={self.timeout_s:g} s "
                        f"({sum(missing.values())} missing); a peer is lost or the network is "
                        "too slow (raise backend.timeout_s).")
                self._lock.wait(min(left, 1.0))
        if self._error is not None:
            raise ConnectionError(f"rank {self.rank}'s inbox refused a message: {self._error}")

    def lost_peers(self, wait_s: float = 2.0) -> list[int]:
        """The peers whose connection closed, waiting up to ``wait_s`` for one (a collective
        can fail on a lost peer a moment before its connection here reports it)."""
        with self._lock:  # every addition to ``lost`` notifies
            self._lock.wait_for(lambda: self.lost, timeout=wait_s)
            return sorted(self.lost)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked on it
            except OSError:
                pass


class Outbox:
    """Sends push-sum halves to peers from a background thread; see the module docstring."""

    def __init__(self, rank: int, secret: bytes, addresses: list[tuple[str, int]],
                 timeout_s: float, capacity: int = 4) -> None:
        self.rank, self.secret, self.addresses, self.timeout_s = rank, secret, addresses, timeout_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=capacity)
        self._socks: dict[int, socket.socket] = {}
        self.sent: dict[int, int] = {}
        """Peer rank -> messages handed over for it (this attempt)."""
        self.bytes_sent = 0
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"gossip-outbox-{rank}")
        self._thread.start()

    def _connect(self, dst: int) -> socket.socket:
        sock = self._socks.get(dst)
        if sock is None:
            sock = socket.create_connection(self.addresses[dst], timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks[dst] = sock
        return sock

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            dst, header, body = item
            try:
                if self._error is None:
                    self.bytes_sent += wire.send(self._connect(dst), self.secret, header, body)
            except OSError as exc:
                host, port = self.addresses[dst]
                self._error = (f"rank {self.rank} could not send to rank {dst} at {host}:{port} "
                               f"({type(exc).__name__}: {exc}); rank {dst} is lost or "
                               "unreachable.")
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise ConnectionError(self._error)

    def offer(self, dst: int, header: dict[str, Any], body: bytes) -> bool:
        """Queue a message for ``dst``; False (nothing queued) when the queue is full."""
        self._raise()
        if self._queue.full():  # one producer: a queue not full now stays not full
            return False
        self._queue.put_nowait((dst, header, body))
        self.sent[dst] = self.sent.get(dst, 0) + 1
        return True

    def flush(self) -> None:
        """Wait (at most ``timeout_s``) until every queued message is written."""
        unsent = join_within(self._queue, self.timeout_s)
        if unsent:
            raise TimeoutError(f"rank {self.rank}: {unsent} message(s) still unsent after "
                               f"backend.timeout_s={self.timeout_s:g} s")
        self._raise()

    def close(self) -> None:
        try:
            self._queue.put(None, timeout=self.timeout_s)
            self._thread.join(self.timeout_s)
        except queue.Full:
            pass
        for sock in self._socks.values():
            sock.close()
