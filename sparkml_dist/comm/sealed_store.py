"""A ``torch.distributed`` store that only holders of the attempt's secret can use.

The rendezvous ``TCPStore`` accepts any client that reaches its port, and ``list_keys`` shows
every key, so a key prefix alone hides nothing. :class:`SealedStore` wraps it:

- every key is replaced by ``HMAC-SHA256(k_name, key)``: a client without the secret learns no
  key name and cannot address a key the ranks will read;
- every value is sealed with AES-GCM (``cryptography``'s ``AESGCM``; key ``k_value``, a fresh
  96-bit nonce per write, the key name as associated data): a client without the secret can read
  no value (gloo's peer addresses included), and a value it writes or replays under another key
  fails authentication with a clear error instead of redirecting a rank;
- counters (``add``, used by torch's store barrier) cannot be sealed; they stay under hashed
  names. A client that guesses nothing can at worst disturb a count, which turns into a bounded
  timeout, never into a connection to it.

``k_name`` and ``k_value`` come from the secret by HKDF-SHA256. The secret is generated on the
driver for each attempt (:func:`new_secret`) and reaches the ranks inside the task closure, which
Spark ships over its RPC (authenticated and encrypted when ``spark.authenticate`` and
``spark.network.crypto.enabled`` are on).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence

import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sparkml_dist.errors import RendezvousError

_NONCE = 12


def new_secret() -> str:
    """A fresh 256-bit secret for one launch attempt (hex)."""
    return secrets.token_hex(32)


def _derive(secret: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        bytes.fromhex(secret))


class SealedStore(dist.Store):
    """Wrap ``store`` so that keys are keyed hashes and values authenticated ciphertext."""

    def __init__(self, store: dist.Store, secret: str) -> None:
        super().__init__()
        if len(secret) < 32:
            raise ValueError("the rendezvous secret must be at least 128 bits (32 hex digits)")
        self._store = store
        self._name_key = _derive(secret, b"sparkml_dist store key names")
        self._aead = AESGCM(_derive(secret, b"sparkml_dist store values"))

    # -- key names and values -----------------------------------------------------------------

    def _key(self, key: str) -> str:
        return "sparkml_dist/" + hmac.new(self._name_key, key.encode(), hashlib.sha256).hexdigest()

    def _seal(self, key: str, value: bytes | str) -> bytes:
        data = value.encode() if isinstance(value, str) else bytes(value)
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, data, key.encode())

    def _open(self, key: str, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], key.encode())
        except InvalidTag:
            raise RendezvousError(
                f"the rendezvous value of {key!r} was not written with this attempt's secret: "
                "a client outside the job wrote it, or a rank of another attempt. It is ignored; "
                "check who can reach the executors' ports (see the README's network "
                "exposure section).") from None

    # -- dist.Store -----------------------------------------------------------------------------

    def set(self, key: str, value: bytes | str) -> None:
        self._store.set(self._key(key), self._seal(key, value))

    def get(self, key: str) -> bytes:
        return self._open(key, self._store.get(self._key(key)))

    def multi_set(self, keys: Sequence[str], values: Sequence[bytes | str]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        return [self.get(k) for k in keys]

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        # Ciphertexts differ on every write, so compare plaintexts (not atomic across clients:
        # torch's rendezvous does not rely on compare_set for gloo).
        want = expected.encode() if isinstance(expected, str) else bytes(expected)
        current = self.get(key) if self.check([key]) else b""
        if current == want:
            self.set(key, desired)
            return desired.encode() if isinstance(desired, str) else bytes(desired)
        return current

    def add(self, key: str, amount: int) -> int:
        return self._store.add(self._key(key), amount)

    def check(self, keys: Sequence[str]) -> bool:
        return self._store.check([self._key(k) for k in keys])

    def delete_key(self, key: str) -> bool:
        return self._store.delete_key(self._key(key))

    def num_keys(self) -> int:
        return self._store.num_keys()

    def wait(self, keys: Sequence[str], timeout: datetime.timedelta | None = None) -> None:
        hashed = [self._key(k) for k in keys]
        if timeout is None:
            self._store.wait(hashed)
        else:
            self._store.wait(hashed, timeout)

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._store.set_timeout(timeout)

    @property
    def timeout(self) -> datetime.timedelta:
        return self._store.timeout
