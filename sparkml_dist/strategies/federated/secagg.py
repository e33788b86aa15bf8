"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth. "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017: the semi-honest protocol
(Fig. 4, without the signature and consistency-check rounds).

Per round, over the roster of sampled clients 1..n and a threshold t:

1. ``advertise``: client u publishes two X25519 public keys, c_u (to encrypt shares) and s_u (to
   agree pairwise masks).
2. ``share_keys``: u Shamir-splits (t of n) its mask private key s_u and a self-mask seed b_u,
   and encrypts share v for client v with AES-GCM under a key agreed from c_u and c_v.
3. ``masked_input``: u sends y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)
   (mod p), where s_uv is the X25519 agreement of s_u and s_v: every pairwise mask appears once
   with each sign, so the masks cancel in the sum.
4. ``unmask``: each surviving client reveals, for every other client, the share of b_v if v's
   masked input arrived and the share of s_v if it did not (never both). With t shares the
   server removes the self masks of survivors and the pairwise masks that dropped clients would
   have cancelled, recovering sum_{u survived} x_u exactly.

Values are field elements (:mod:`.field`); the mask PRG is AES-256-CTR. Uses ``cryptography``
(X25519, HKDF, AES) and ``pycryptodome`` (Shamir over GF(2^128)); no Spark, files or global RNG.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sparkml_dist.strategies.federated import field

_SHARE_LEN = 16  # pycryptodome's Shamir shares 16-byte secrets


def _hkdf(material: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)


def client_secret(job_key: bytes, round_index: int, client: str) -> bytes:
    """The 32-byte secret client ``client`` derives its round keys from (in a task, never on the
    server side). ``job_key`` is random per driver process, so masks differ between runs; the
    sums they protect do not."""
    return _hkdf(job_key, f"sparkml_dist/secagg/client/{round_index}/{client}".encode())


def threshold_for(n: int, fraction: float) -> int:
    """Shares needed to reconstruct: ``max(2, ceil(fraction * n))``, at most n."""
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients in a round; got {n}. "
                         "Raise strategy.clients_per_round.")
    return min(n, max(2, math.ceil(fraction * n)))


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` field elements expanded from a 32-byte ``seed`` with AES-256-CTR."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    raw = np.frombuffer(enc.update(b"\0" * (8 * length)) + enc.finalize(), dtype=np.uint64)
    return ((raw & np.uint64(field.P)) % np.uint64(field.P)).astype(np.int64)


def _pairwise_mask(own: X25519PrivateKey, peer_s_pk: bytes, length: int) -> np.ndarray:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_s_pk))
    return prg(_hkdf(shared, b"sparkml_dist/secagg/pairwise-mask"), length)


def _self_mask(b_seed: bytes, length: int) -> np.ndarray:
    return prg(_hkdf(b_seed, b"sparkml_dist/secagg/self-mask"), length)


@dataclass(frozen=True)
class PublicKeys:
    """What ``advertise`` sends: the client's roster index and two raw X25519 public keys."""

    index: int
    c_pk: bytes
    s_pk: bytes


def _share_plaintext(u: int, v: int, s1: bytes, s2: bytes, b: bytes) -> bytes:
    return struct.pack(">II", u, v) + s1 + s2 + b


def _share_nonce(u: int, v: int) -> bytes:
    # The u->v and v->u messages share one agreed key; distinct nonces keep GCM safe.
    return struct.pack(">IIxxxx", u, v)


class SecAggClient:
    """One client's side of one round. Its keys come from ``secret`` alone, so a retried Spark
    task rebuilds the same client."""

    def __init__(self, secret: bytes, index: int) -> None:
        if index < 1:
            raise ValueError(f"roster indices start at 1; got {index}")
        self.index = index
        material = _hkdf(secret, b"sparkml_dist/secagg/keys", 96)
        self._c_sk = X25519PrivateKey.from_private_bytes(material[:32])
        self._s_sk = X25519PrivateKey.from_private_bytes(material[32:64])
        self._b = material[64:64 + _SHARE_LEN]

    def advertise(self) -> PublicKeys:
        return PublicKeys(self.index, self._c_sk.public_key().public_bytes_raw(),
                          self._s_sk.public_key().public_bytes_raw())

    def _pair_key(self, c_pk: bytes) -> bytes:
        shared = self._c_sk.exchange(X25519PublicKey.from_public_bytes(c_pk))
        return _hkdf(shared, b"sparkml_dist/secagg/share-encryption")

    def share_keys(self, roster: dict[int, PublicKeys], threshold: int) -> dict[int, bytes]:
        """Encrypted Shamir shares of this client's s key and b seed, one per roster member
        (this client included), keyed by the recipient's index."""
        from Crypto.Protocol.SecretSharing import Shamir

        n = len(roster)
        if sorted(roster) != list(range(1, n + 1)):
            raise ValueError("the roster must hold indices 1..n")
        s_raw = self._s_sk.private_bytes_raw()
        splits = [Shamir.split(threshold, n, part) for part in
                  (s_raw[:_SHARE_LEN], s_raw[_SHARE_LEN:], self._b)]
        out: dict[int, bytes] = {}
        for v, keys in roster.items():
            s1, s2, b = (split[v - 1] for split in splits)
            assert s1[0] == v and s2[0] == v and b[0] == v
            plain = _share_plaintext(self.index, v, s1[1], s2[1], b[1])
            out[v] = AESGCM(self._pair_key(keys.c_pk)).encrypt(
                _share_nonce(self.index, v), plain, None)
        return out

    def masked_input(self, x: np.ndarray, roster: dict[int, PublicKeys]) -> np.ndarray:
        """``x`` (field elements) plus the self mask and this client's signed pairwise masks."""
        y = field.add(np.asarray(x, dtype=np.int64), _self_mask(self._b, x.size))
        for v, keys in roster.items():
            if v == self.index:
                continue
            mask = _pairwise_mask(self._s_sk, keys.s_pk, x.size)
            y = field.add(y, mask) if self.index < v else field.sub(y, mask)
        return y

    def unmask(self, incoming: dict[int, bytes], roster: dict[int, PublicKeys],
               survivors: set[int]) -> dict[int, tuple[str, bytes]]:
        """For each sender v of ``incoming`` (ciphertexts addressed to this client): the share of
        b_v if v survived, else the share of s_v, as ``(kind, share bytes)``."""
        out: dict[int, tuple[str, bytes]] = {}
        for v, ct in incoming.items():
            plain = AESGCM(self._pair_key(roster[v].c_pk)).decrypt(
                _share_nonce(v, self.index), ct, None)
            u, to = struct.unpack(">II", plain[:8])
            if (u, to) != (v, self.index):
                raise ValueError(f"share from {v} to {self.index} claims to be {u}->{to}")
            s1, s2, b = (plain[8 + i * _SHARE_LEN:8 + (i + 1) * _SHARE_LEN] for i in range(3))
            out[v] = ("b", b) if v in survivors else ("s", s1 + s2)
        return out


def route(shares_by_sender: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
    """The server's forwarding of encrypted shares: ``{recipient: {sender: ciphertext}}``."""
    out: dict[int, dict[int, bytes]] = {}
    for sender, by_recipient in shares_by_sender.items():
        for recipient, ct in by_recipient.items():
            out.setdefault(recipient, {})[sender] = ct
    return out


class SecAggServer:
    """The server's side of one round: add masked inputs, then unmask their sum."""

    def __init__(self, roster: dict[int, PublicKeys], threshold: int, length: int) -> None:
        self.roster = roster
        self.threshold = threshold
        self.length = length
        self.total = np.zeros(length, dtype=np.int64)
        self.survivors: set[int] = set()

    def add_masked(self, index: int, y: np.ndarray) -> None:
        if index not in self.roster or index in self.survivors:
            raise ValueError(f"masked input from {index}: not on the roster or sent twice")
        if y.shape != (self.length,):
            raise ValueError(f"masked input of {y.size} values; expected {self.length}")
        self.total = field.add(self.total, y)
        self.survivors.add(index)

    def unmask(self, responses: dict[int, dict[int, tuple[str, bytes]]]) -> np.ndarray:
        """The field sum of the survivors' inputs, from the ``unmask`` answers of at least
        ``threshold`` survivors."""
        from Crypto.Protocol.SecretSharing import Shamir

        responders = sorted(r for r in responses if r in self.survivors)
        if len(responders) < self.threshold:
            raise ValueError(f"{len(responders)} clients answered the unmasking step; "
                             f"{self.threshold} are needed to recover the sum")
        responders = responders[:self.threshold]
        total = self.total.copy()
        for v in sorted(self.roster):
            got = [responses[r][v] for r in responders]
            if v in self.survivors:
                if any(kind != "b" for kind, _ in got):
                    raise ValueError(f"client {v} survived but a share of its s key was sent")
                seed = Shamir.combine([(r, share) for r, (_, share) in zip(responders, got)])
                total = field.sub(total, _self_mask(seed, self.length))
                continue
            if any(kind != "s" for kind, _ in got):
                raise ValueError(f"client {v} dropped but a share of its self mask was sent")
            s_sk = X25519PrivateKey.from_private_bytes(b"".join(
                Shamir.combine([(r, share[i * _SHARE_LEN:(i + 1) * _SHARE_LEN])
                                for r, (_, share) in zip(responders, got)]) for i in range(2)))
            for u in self.survivors:
                mask = _pairwise_mask(s_sk, self.roster[u].s_pk, self.length)
                # y_u holds +mask when u < v and -mask when u > v: take it out.
                total = field.sub(total, mask) if u < v else field.add(total, mask)
        return total
