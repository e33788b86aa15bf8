"""Differential privacy for federated rounds: clipping, Gaussian noise and accounting.

- Client-level DP (DP-FedAvg): McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private
  Recurrent Language Models", ICLR 2018. Each client's update is clipped to L2 norm C; the server
  adds N(0, (z C)^2) to the sum and divides by the expected number of clients, so one client
  changes the released average by at most C / (q N). Clients are Poisson-sampled with rate q.
- Sample-level DP-SGD inside a client: Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang.
  "Deep Learning with Differential Privacy", CCS 2016 (done through Opacus in the client).
- Accounting: Google's ``dp-accounting`` library (Renyi DP, Mironov 2017, or privacy loss
  distributions), never by hand here.

Torch and dp-accounting only; noise takes an explicit generator.
"""

from __future__ import annotations

import math

import torch


def clip_update(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale ``update`` to L2 norm at most ``clip_norm``; return it and its norm before."""
    norm = float(torch.linalg.vector_norm(update.to(torch.float64)))
    if norm <= clip_norm or norm == 0.0:
        return update.clone(), norm
    return update * (clip_norm / norm), norm


def gaussian_noise(size: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """``size`` draws of N(0, std^2) from ``generator`` (float32)."""
    return torch.randn(size, generator=generator, dtype=torch.float32) * std


def _accountant(kind: str):
    from dp_accounting import pld, rdp

    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}; expected rdp or pld")


def _epsilon(event, delta: float, accountant: str) -> float:
    acc = _accountant(accountant)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def client_level_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int,
                         delta: float, accountant: str = "rdp") -> float:
    """Central client-level DP: ``rounds`` Poisson-sampled (rate q) Gaussian mechanisms with
    noise multiplier z (sensitivity: one client's clipped update). ``inf`` without noise."""
    import dp_accounting as dpa

    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(min(1.0, sampling_rate), dpa.GaussianDpEvent(noise_multiplier)),
        rounds)
    return _epsilon(event, delta, accountant)


def local_epsilon(noise_multiplier: float, participations: int, delta: float,
                  accountant: str = "rdp") -> float:
    """Local DP: a client noises its own clipped update; the server sees who sent it, so there is
    no sampling amplification, and two inputs of one client differ by up to 2C (noise multiplier
    z/2 against that sensitivity), composed over the rounds the client took part in."""
    import dp_accounting as dpa

    if participations == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise_multiplier / 2.0), participations)
    return _epsilon(event, delta, accountant)


def sample_level_epsilon(noise_multiplier: float, sampling_rate: float, steps: int,
                         delta: float, accountant: str = "rdp") -> float:
    """DP-SGD for one row: ``steps`` Poisson-sampled (rate batch/rows) Gaussian steps."""
    return client_level_epsilon(noise_multiplier, sampling_rate, steps, delta, accountant)


class PrivacyLedger:
    """What the accountant needs to know about rounds done so far, for each DP mode:

    - central client-level: the number of rounds (every round is one Poisson-sampled release);
    - local client-level: how many rounds each client took part in (epsilon of the worst client);
    - sample-level: each client's DP-SGD steps and sampling rate (epsilon of the worst client's
      rows; client sampling would only lower it, and is not counted).
    """

    def __init__(self, level: str, noise_at: str, noise_multiplier: float, delta: float,
                 accountant: str, client_rate: float) -> None:
        self.level, self.noise_at = level, noise_at
        self.z, self.delta, self.accountant = noise_multiplier, delta, accountant
        self.client_rate = client_rate
        self.rounds = 0
        self.participations: dict[str, int] = {}
        self.steps: dict[str, int] = {}
        self.rates: dict[str, float] = {}
        self._memo: dict[tuple[float, int], float] = {}

    def _sample_eps(self, rate: float, steps: int) -> float:
        key = (rate, steps)
        if key not in self._memo:
            self._memo[key] = sample_level_epsilon(self.z, rate, steps, self.delta,
                                                   self.accountant)
        return self._memo[key]

    def epsilon(self, extra: dict[str, tuple[float, int]] | None = None,
                extra_round: bool = False) -> float:
        """Epsilon at ``delta`` so far, or after one more round (``extra_round``) in which the
        clients of ``extra`` (id -> (row sampling rate, local steps)) take part."""
        extra = extra or {}
        if self.level == "client" and self.noise_at == "server":
            return client_level_epsilon(self.z, self.client_rate,
                                        self.rounds + int(extra_round), self.delta,
                                        self.accountant)
        if self.level == "client":
            most = max([self.participations.get(c, 0) + 1 for c in extra]
                       + list(self.participations.values()) + [0])
            return local_epsilon(self.z, most, self.delta, self.accountant)
        worst = 0.0
        for c in set(self.steps) | set(extra):
            rate, more = extra.get(c, (self.rates.get(c, 0.0), 0))
            worst = max(worst, self._sample_eps(rate, self.steps.get(c, 0) + more))
        return worst

    def record(self, answered: dict[str, tuple[float, int]]) -> None:
        """Count a finished round; ``answered``: client id -> (row sampling rate, steps)."""
        self.rounds += 1
        for c, (rate, steps) in answered.items():
            self.participations[c] = self.participations.get(c, 0) + 1
            self.steps[c] = self.steps.get(c, 0) + steps
            self.rates[c] = rate

    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "participations": dict(self.participations),
                "steps": dict(self.steps), "rates": dict(self.rates)}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])
        self.participations = dict(state["participations"])
        self.steps = dict(state["steps"])
        self.rates = dict(state["rates"])
