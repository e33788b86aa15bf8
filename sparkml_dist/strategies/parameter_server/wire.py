"""The parameter servers' wire format: one authenticated frame per message, no pickle.

A frame is ``>II`` (header length, body length), a 32-byte HMAC-SHA256 over those eight bytes,
the header and the body under the job's secret, then the header (UTF-8 JSON object) and the
body (raw bytes: float32 little-endian tensors, concatenated in the shard's parameter order).
A frame whose tag does not verify is refused before its header is parsed. The secret is drawn
by the driver per job and reaches workers inside the Spark task closure only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
from typing import Any

import numpy as np

_PREFIX = struct.Struct(">II")
_TAG = 32
MAX_HEADER = 1 << 24
MAX_BODY = 1 << 34
"""The largest body a client accepts; a server passes its own, far smaller bound to
:func:`recv` (:func:`max_body_for`)."""
HEADER_SLACK = 1 << 16
"""Bytes a server allows beyond a shard's values in one request's body."""


def max_body_for(numel: int) -> int:
    """The largest body a server of a ``numel``-value shard can legitimately receive (a push's
    float32 gradient), plus slack."""
    return 4 * numel + HEADER_SLACK


class WireError(ConnectionError):
    """A frame that could not be read: the peer closed, or it failed authentication."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError(f"connection closed by the peer after {got} of {n} bytes")
        got += k
    return bytes(buf)


def send(sock: socket.socket, secret: bytes, header: dict[str, Any], body: bytes = b"") -> int:
    """Send one frame; return the bytes written."""
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(len(head), len(body))
    mac = hmac.new(secret, prefix, hashlib.sha256)
    mac.update(head)
    mac.update(body)
    sock.sendall(prefix + mac.digest() + head)
    if body:
        sock.sendall(body)
    return len(prefix) + _TAG + len(head) + len(body)


def recv(sock: socket.socket, secret: bytes, max_body: int = MAX_BODY
         ) -> tuple[dict[str, Any], bytes, int]:
    """Read one frame; return ``(header, body, bytes read)``. Raises :class:`WireError` when the
    peer closed, the frame does not authenticate, or its prefix announces more than
    ``max_body`` body bytes (refused before anything past the prefix is read, so a peer
    without the secret cannot make the reader buffer it)."""
    prefix = _recv_exact(sock, _PREFIX.size)
    hlen, blen = _PREFIX.unpack(prefix)
    if hlen > MAX_HEADER or blen > max_body:
        raise WireError(f"frame of {hlen} header / {blen} body bytes is over the limits; the "
                        "peer is not a parameter server of this job")
    tag = _recv_exact(sock, _TAG)
    head = _recv_exact(sock, hlen)
    body = _recv_exact(sock, blen) if blen else b""
    mac = hmac.new(secret, prefix, hashlib.sha256)
    mac.update(head)
    mac.update(body)
    if not hmac.compare_digest(mac.digest(), tag):
        raise WireError("frame failed authentication (wrong job secret)")
    header = json.loads(head)
    if not isinstance(header, dict):
        raise WireError("frame header is not a JSON object")
    return header, body, _PREFIX.size + _TAG + hlen + blen


def to_bytes(vec: np.ndarray) -> bytes:
    """A float32 vector as little-endian bytes."""
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def from_bytes(body: bytes, expected: int, what: str) -> np.ndarray:
    """Little-endian float32 bytes as a writable vector of ``expected`` values."""
    if len(body) != 4 * expected:
        raise WireError(f"{what}: {len(body)} bytes, expected {4 * expected} ({expected} float32)")
    return np.frombuffer(body, dtype="<f4").astype(np.float32)
