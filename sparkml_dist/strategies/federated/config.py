"""Settings of the ``federated`` strategy (``strategy.kind: federated``).

Stdlib, typing and :mod:`sparkml_dist.errors` only: :mod:`sparkml_dist.config` imports this
module into its ``strategy:`` union. The client optimizer is ``optimizer:`` of the job and the
seed is ``training.seed``; everything that only a federated job has lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparkml_dist.errors import ConfigError

ServerOptimizer = Literal["fedavg", "fedadam", "fedyogi"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Differential privacy, accounted by Google's ``dp-accounting`` library."""

    level: Literal["client", "sample"] = "client"
    """``client``: each client's whole update is clipped and noised (DP-FedAvg, user-level
    privacy). ``sample``: DP-SGD inside every client (per-example clipping and noise through
    Opacus), protecting single rows."""
    noise_at: Literal["server", "client"] = "server"
    """For ``level: client``: ``server`` adds one Gaussian draw to the sum of clipped updates
    (central DP, amplified by Poisson client sampling); ``client`` makes every client noise its
    own clipped update before sending it (local DP, no amplification)."""
    clip_norm: float = 1.0
    """L2 bound on one client's update (``client``) or on one row's gradient (``sample``)."""
    noise_multiplier: float = 1.0
    """Gaussian noise standard deviation in units of ``clip_norm``."""
    delta: float = 1e-5
    """The delta at which epsilon is reported (below 1 / number of clients or rows)."""
    epsilon_budget: float | None = None
    """Stop before the round that would take epsilon past this (None: never stop)."""
    accountant: Literal["rdp", "pld"] = "rdp"
    """``dp-accounting`` accountant: Renyi DP or privacy loss distributions (tighter, slower)."""

    def __post_init__(self) -> None:
        _check(self.clip_norm > 0, f"strategy.privacy.clip_norm must be > 0; got {self.clip_norm}.")
        _check(self.noise_multiplier >= 0,
               f"strategy.privacy.noise_multiplier must be >= 0; got {self.noise_multiplier}.")
        _check(0 < self.delta < 1, f"strategy.privacy.delta must be in (0, 1); got {self.delta}.")
        _check(self.epsilon_budget is None or self.epsilon_budget > 0,
               f"strategy.privacy.epsilon_budget must be > 0 or unset; got {self.epsilon_budget}.")
        _check(self.level == "client" or self.noise_at == "server",
               "strategy.privacy.noise_at applies to level=client only; DP-SGD (level=sample) "
               "always noises inside the client. Remove noise_at or set level=client.")


@dataclass(frozen=True, kw_only=True)
class SecureAggregationConfig:
    """Secure aggregation (Bonawitz et al. 2017): the server learns only the sum of updates."""

    threshold: float = 0.5
    """Share of a round's clients whose secret shares reconstruct a key: t = max(2, ceil(
    threshold * n)). The sum survives up to n - t drop-outs after masking."""
    quant_bits: int = 16
    """Fixed-point fraction bits when updates are quantized into the field of integers modulo
    2**61 - 1 (quantization error per value at most 2**-(quant_bits + 1) before weighting)."""

    def __post_init__(self) -> None:
        _check(0 < self.threshold <= 1,
               f"strategy.secure_aggregation.threshold must be in (0, 1]; got {self.threshold}.")
        _check(1 <= self.quant_bits <= 40,
               f"strategy.secure_aggregation.quant_bits must be in [1, 40]; got {self.quant_bits}.")


@dataclass(frozen=True, kw_only=True)
class ClientCrash:
    """TEST-ONLY: the Python worker training ``client`` in ``round`` exits hard (``os._exit``)
    on its first task attempt, so Spark has to retry the task."""

    round: int
    """Round (0-based) in which the client's task dies."""
    client: str
    """The client's id, as ``str(client value)``."""


@dataclass(frozen=True, kw_only=True)
class FederatedConfig:
    """Federated rounds: sample clients, train each locally on its own rows, aggregate."""

    kind: Literal["federated"] = "federated"
    """Discriminator of the ``strategy:`` section."""
    client_col: str | None = None
    """Column whose distinct values are the clients (a user, a device, a hospital). None: the
    partitions of the input DataFrame are the clients."""
    rounds: int = 10
    """Communication rounds."""
    clients_per_round: int | None = None
    """Clients sampled per round (None: every client, every round). With ``sampling: poisson``
    this is the expected number."""
    sampling: Literal["fixed", "poisson"] = "fixed"
    """``fixed``: exactly ``clients_per_round`` distinct clients, seeded by (seed, round).
    ``poisson``: each client joins with probability clients_per_round / clients (what the
    client-level DP accountant assumes)."""
    local_epochs: int = 1
    """Passes over its own rows each sampled client makes per round."""
    local_steps: int = 0
    """When > 0, exactly this many local mini-batch steps instead of ``local_epochs``."""
    local_batch_size: int = 32
    """Mini-batch size on a client (a batch at least a client's row count is full-batch)."""
    proximal_mu: float = 0.0
    """FedProx proximal weight mu (Li et al. 2020): clients minimise loss + mu/2 ||w - w_t||^2.
    0 is plain FedAvg local training."""
    server_optimizer: ServerOptimizer = "fedavg"
    """How the server applies the averaged update: ``fedavg`` (w += server_lr * avg),
    ``fedadam`` or ``fedyogi`` (Reddi et al. 2021, adaptive server optimizers)."""
    server_lr: float = 1.0
    """Server learning rate (1 with ``fedavg`` is McMahan et al.'s FedAvg)."""
    server_beta1: float = 0.9
    """FedAdam/FedYogi first-moment decay."""
    server_beta2: float = 0.99
    """FedAdam/FedYogi second-moment decay."""
    server_tau: float = 1e-3
    """FedAdam/FedYogi adaptivity (added to the root of the second moment)."""
    min_answered_fraction: float = 0.5
    """A round proceeds with the clients that answered if at least this share of the sampled
    ones did; below it the job fails naming who did not answer and why."""
    eval_every_rounds: int = 1
    """Evaluate the global model on the validation rows every this many rounds (and the last)."""
    round_timeout_s: float = 900.0
    """Bound on one round's Spark stages; past it the stages are cancelled and the job fails."""
    privacy: PrivacyConfig | None = None
    """Differential privacy (None: off)."""
    secure_aggregation: SecureAggregationConfig | None = None
    """Secure aggregation of the updates (None: updates travel in the clear)."""
    simulate_dropout: float = 0.0
    """EXPERIMENTS/TESTS: this share of each round's sampled clients (chosen by (seed, round))
    trains and masks but its update never reaches the server."""
    inject_crash: ClientCrash | None = None
    """TEST-ONLY: kill one client's task once (see :class:`ClientCrash`)."""

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, f"strategy.rounds must be >= 1; got {self.rounds}.")
        _check(self.clients_per_round is None or self.clients_per_round >= 1,
               f"strategy.clients_per_round must be >= 1 or unset; got {self.clients_per_round}.")
        _check(self.local_epochs >= 1 and self.local_steps >= 0,
               "strategy.local_epochs must be >= 1 and strategy.local_steps >= 0; got "
               f"{self.local_epochs} and {self.local_steps}.")
        _check(self.local_batch_size >= 1,
               f"strategy.local_batch_size must be >= 1; got {self.local_batch_size}.")
        _check(self.proximal_mu >= 0, f"strategy.proximal_mu must be >= 0; got {self.proximal_mu}.")
        _check(self.server_lr > 0, f"strategy.server_lr must be > 0; got {self.server_lr}.")
        _check(0 <= self.server_beta1 < 1 and 0 <= self.server_beta2 < 1 and self.server_tau > 0,
               "strategy.server_beta1/server_beta2 must be in [0, 1) and server_tau > 0.")
        _check(0 < self.min_answered_fraction <= 1, "strategy.min_answered_fraction must be in "
               f"(0, 1]; got {self.min_answered_fraction}.")
        _check(self.eval_every_rounds >= 1, "strategy.eval_every_rounds must be >= 1.")
        _check(self.round_timeout_s > 0, "strategy.round_timeout_s must be > 0.")
        _check(0 <= self.simulate_dropout < 1,
               f"strategy.simulate_dropout must be in [0, 1); got {self.simulate_dropout}.")
        _check(self.sampling == "fixed" or self.clients_per_round is not None,
               "strategy.sampling=poisson needs strategy.clients_per_round (the expected number "
               "of clients per round).")
        p = self.privacy
        _check(p is None or p.level == "client" or self.proximal_mu == 0,
               "strategy.proximal_mu > 0 with DP-SGD (privacy.level=sample) is not supported: "
               "the proximal gradient would bypass per-example clipping. Set proximal_mu=0 or "
               "privacy.level=client.")
        if p is not None and p.level == "client" and p.noise_at == "server":
            _check(self.sampling == "poisson" or self.clients_per_round is None,
                   "central client-level DP is accounted for Poisson client sampling: set "
                   "strategy.sampling=poisson (or sample every client: unset clients_per_round).")
